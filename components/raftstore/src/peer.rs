//! The raft side of one region's peer: its `RawNode`, proposals waiting to be applied,
//! linearizable reads waiting for their read index, hibernation, and the Ready cycle split
//! into two halves around the poll round's single synced write:
//!
//! 1. [`Peer::collect_ready`] (during the round): take the `Ready`, send the messages that may
//!    precede persistence (a leader's appends), and put entries, hard state and any received
//!    snapshot's states into the round's shared `WriteBatch`.
//! 2. the poller writes that batch once, with one fsync, for every region of the round;
//! 3. [`Peer::post_ready`] (after the write): send the messages that depended on it, advance
//!    raft, and hand committed entries to the apply side.

use crate::meta::LeaderLease;
use crate::msg::{ReadCallback, RegionSnapshot, WriteCallback, WriteResponse};
use crate::storage::PeerStorage;
use crate::store::StoreContext;
use crate::util::{self, check_epoch};
use crate::{Error, Result};
use atoll_engine::KvEngine;
use atoll_proto::metapb;
use atoll_proto::raft_cmdpb::{AdminCmdType, RaftCmdRequest, RaftRequestHeader};
use atoll_proto::raft_serverpb::{ExtraMessageType, RaftMessage, SnapshotMeta};
use protobuf::Message as PbMessage;
use raft::eraftpb::{self, ConfChange, ConfChangeType, Entry, MessageType};
use raft::{RawNode, Ready, StateRole};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Proposal {
    pub index: u64,
    pub term: u64,
    /// When it was proposed: once committed, a quorum has heard from this leader since.
    pub proposed_at: Instant,
    pub cb: WriteCallback,
}

struct ReadBatch<S> {
    id: u64,
    index: Option<u64>,
    issued_tick: u64,
    /// When its read index was requested (before the heartbeat carrying it left).
    issued_at: Instant,
    reads: Vec<(metapb::RegionEpoch, ReadCallback<S>)>,
}

pub struct Peer<E: KvEngine> {
    pub region_id: u64,
    pub meta: metapb::Peer,
    pub tag: String,
    pub raft_group: RawNode<PeerStorage<E>>,
    pub peer_cache: HashMap<u64, metapb::Peer>,
    /// Last time each other peer was heard from (leader's view).
    pub peer_heartbeats: HashMap<u64, Instant>,
    pub proposals: VecDeque<Proposal>,
    pending_reads: Vec<(metapb::RegionEpoch, ReadCallback<E::Snapshot>)>,
    inflight_reads: VecDeque<ReadBatch<E::Snapshot>>,
    pub hibernating: bool,
    idle_ticks: usize,
    pub ticks: u64,
    pub applied_index: u64,
    pub applied_term: u64,
    /// Highest index handed to the apply side.
    pub last_sent_to_apply: u64,
    /// Committed entries handed to the apply side and not applied yet: (last index, bytes)
    /// per hand-over. Bounds what this peer fetches from the log (see [`Self::apply_budget`]).
    apply_pending: VecDeque<(u64, u64)>,
    apply_pending_bytes: u64,
    /// The last ready left committed entries in the log because apply is behind.
    apply_held: bool,
    pub pending_remove: bool,
    pub applying_snapshot: bool,
    /// Committed entries held while a snapshot is being applied.
    pub pending_committed: Vec<Entry>,
    /// The snapshot being applied (its metadata and the apply state it sets), kept so that a
    /// failed apply can be tried again: raft already counts the snapshot as applied, so the
    /// peer must not go on (nor serve) until its data is in.
    pub applying_snap: Option<(SnapshotMeta, atoll_proto::raft_serverpb::RaftApplyState)>,
    /// Failed attempts at applying `applying_snap`.
    pub snap_apply_failures: u32,
    pending_ready: Option<Ready>,
    pending_snapshot: Option<SnapshotMeta>,
    pub leader_missing_since: Option<Instant>,
    pub last_validate: Option<Instant>,
    // Split and size bookkeeping.
    pub approximate_size: Option<u64>,
    pub approximate_keys: Option<u64>,
    pub size_diff_hint: u64,
    pub keys_diff_hint: u64,
    pub split_check_pending: bool,
    pub raft_log_size_hint: u64,
    pub written_bytes: u64,
    pub written_keys: u64,
    /// The store's view of whether this peer is a leader ready to serve local snapshots.
    published: Option<(u64, bool, Option<u64>)>,
    /// Campaign on start (the new half of a split whose parent this store led).
    pub campaign_on_start: bool,
    /// This leadership's lease (shared with the read delegate) and the term it belongs to.
    lease: Arc<LeaderLease>,
    lease_term: u64,
    /// A term in which this leader sent `MsgTimeoutNow`: the target may campaign, with votes
    /// that ignore leases, at any later time, so no lease is trusted for the rest of the term.
    no_lease_term: u64,
    /// A split or membership change is proposed up to this index: no lease until it is applied
    /// (a split moves keys to regions led elsewhere; a membership change changes the quorum).
    lease_blocked_until: u64,
}

pub fn raft_config(cfg: &crate::Config, peer_id: u64, applied: u64) -> raft::Config {
    raft::Config {
        id: peer_id,
        election_tick: cfg.raft_election_timeout_ticks,
        heartbeat_tick: cfg.raft_heartbeat_ticks,
        applied,
        max_size_per_msg: cfg.raft_max_size_per_msg.0,
        max_inflight_msgs: cfg.raft_max_inflight_msgs,
        check_quorum: true,
        pre_vote: true,
        read_only_option: raft::ReadOnlyOption::Safe,
        batch_append: true,
        max_committed_size_per_ready: 16 << 20,
        ..Default::default()
    }
}

impl<E: KvEngine> Peer<E> {
    pub fn new(ctx: &StoreContext<E>, region: metapb::Region, meta: metapb::Peer) -> Result<Self> {
        let tag = format!("[region {}] peer {}", region.id, meta.id);
        let storage = PeerStorage::new(
            ctx.engine.clone(),
            region.clone(),
            tag.clone(),
            ctx.cfg.raft_entry_cache_size.0 as usize,
        )?;
        let applied = storage.applied_index();
        let applied_term = storage.apply_state.applied_term;
        let logger = ctx
            .logger
            .new(slog::o!("region_id" => region.id, "peer_id" => meta.id));
        let raft_group = RawNode::new(&raft_config(&ctx.cfg, meta.id, applied), storage, &logger)?;
        let mut peer_cache = HashMap::new();
        for p in &region.peers {
            peer_cache.insert(p.id, *p);
        }
        Ok(Peer {
            region_id: region.id,
            meta,
            tag,
            raft_group,
            peer_cache,
            peer_heartbeats: HashMap::new(),
            proposals: VecDeque::new(),
            pending_reads: vec![],
            inflight_reads: VecDeque::new(),
            hibernating: false,
            idle_ticks: 0,
            ticks: 0,
            applied_index: applied,
            applied_term,
            last_sent_to_apply: applied,
            apply_pending: VecDeque::new(),
            apply_pending_bytes: 0,
            apply_held: false,
            pending_remove: false,
            applying_snapshot: false,
            pending_committed: vec![],
            applying_snap: None,
            snap_apply_failures: 0,
            pending_ready: None,
            pending_snapshot: None,
            leader_missing_since: None,
            last_validate: None,
            approximate_size: None,
            approximate_keys: None,
            size_diff_hint: 0,
            keys_diff_hint: 0,
            split_check_pending: false,
            raft_log_size_hint: 0,
            written_bytes: 0,
            written_keys: 0,
            published: None,
            campaign_on_start: false,
            lease: Arc::new(LeaderLease::new()),
            lease_term: 0,
            no_lease_term: 0,
            lease_blocked_until: 0,
        })
    }

    pub fn region(&self) -> &metapb::Region {
        &self.raft_group.store().region
    }

    pub fn is_initialized(&self) -> bool {
        self.raft_group.store().is_initialized()
    }

    pub fn is_leader(&self) -> bool {
        self.raft_group.raft.state == StateRole::Leader
    }

    pub fn term(&self) -> u64 {
        self.raft_group.raft.term
    }

    pub fn leader_id(&self) -> u64 {
        self.raft_group.raft.leader_id
    }

    pub fn leader(&self) -> Option<metapb::Peer> {
        let id = self.leader_id();
        if id == raft::INVALID_ID {
            return None;
        }
        self.peer_cache.get(&id).cloned()
    }

    pub fn not_leader(&self) -> Error {
        Error::NotLeader {
            region_id: self.region_id,
            leader: self.leader(),
        }
    }

    /// Whether this peer can serve reads and local snapshots: leader, with an entry of its
    /// own term applied.
    pub fn leader_ready(&self) -> bool {
        self.is_leader() && self.applied_term == self.term()
    }

    pub fn needs_poll(&self) -> bool {
        if self.applying_snapshot || self.pending_remove || !self.raft_group.has_ready() {
            return false;
        }
        // Committed entries held back for a lagging apply wait for its next result (a
        // message that schedules this peer again), not for another round now.
        !self.apply_held || self.has_work_besides_committed()
    }

    fn has_work_besides_committed(&self) -> bool {
        let raft = &self.raft_group.raft;
        !raft.msgs.is_empty()
            || !raft.read_states.is_empty()
            || !raft.raft_log.unstable_entries().is_empty()
            || self.raft_group.snap().is_some()
    }

    // ---------------- apply flow control ----------------

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
        let store_total = ctx
            .apply_pending_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
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
        ctx.apply_pending_bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
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
        ctx.apply_pending_bytes
            .fetch_sub(freed, std::sync::atomic::Ordering::Relaxed);
    }

    /// Nothing handed to the apply side is pending any more (a snapshot replaced it, or the
    /// peer is being destroyed).
    pub fn clear_apply_pending(&mut self, ctx: &StoreContext<E>) {
        self.apply_pending.clear();
        ctx.apply_pending_bytes.fetch_sub(
            std::mem::take(&mut self.apply_pending_bytes),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    // ---------------- waking and hibernating ----------------

    pub fn wake(&mut self, ctx: &StoreContext<E>) {
        self.idle_ticks = 0;
        if self.hibernating {
            self.hibernating = false;
            // Time did not pass for raft while asleep: restart its clocks so that a leader
            // does not judge its quorum on silence it caused itself, nor a follower campaign
            // at once.
            self.raft_group.raft.election_elapsed = 0;
            if self.is_leader() {
                for (_, pr) in self.raft_group.raft.mut_prs().iter_mut() {
                    pr.recent_active = true;
                }
                let now = Instant::now();
                for t in self.peer_heartbeats.values_mut() {
                    *t = now;
                }
            }
            ctx.set_awake(self.region_id, true);
        }
    }

    /// A sleeping follower was asked for a leader's work: a client could not reach the
    /// leader, or holds an old route. Wake the group, so that if the leader is gone (cut off
    /// without the connection breaking, say) the followers notice and elect; if it is alive,
    /// it answers the wake-up and the group soon sleeps again.
    pub fn wake_if_asked_to_lead(&mut self, ctx: &StoreContext<E>) {
        if self.hibernating && !self.is_leader() {
            self.wake_group(ctx);
        }
    }

    /// Wakes and tells the other peers to wake too (a follower that suspects its leader).
    pub fn wake_group(&mut self, ctx: &StoreContext<E>) {
        self.wake(ctx);
        let ids: Vec<u64> = self
            .region()
            .peers
            .iter()
            .map(|p| p.id)
            .filter(|id| *id != self.meta.id)
            .collect();
        for id in ids {
            self.send_extra(ctx, id, ExtraMessageType::WakeUp);
        }
    }

    fn send_extra(&self, ctx: &StoreContext<E>, to: u64, extra: ExtraMessageType) {
        let Some(to_peer) = self.peer_cache.get(&to).cloned() else {
            return;
        };
        let region = self.region();
        let msg = RaftMessage {
            region_id: self.region_id,
            from_peer: Some(self.meta),
            to_peer: Some(to_peer),
            region_epoch: region.region_epoch,
            start_key: region.start_key.clone(),
            end_key: region.end_key.clone(),
            extra: extra as i32,
            term: self.term(),
            last_index: self.raft_group.raft.raft_log.last_index(),
            ..Default::default()
        };
        ctx.trans.send(msg);
    }

    /// Handles a hibernation control message. Returns false if it should be ignored.
    pub fn on_extra_message(&mut self, ctx: &StoreContext<E>, msg: &RaftMessage) {
        match ExtraMessageType::try_from(msg.extra).unwrap_or(ExtraMessageType::None) {
            ExtraMessageType::Hibernate => {
                let from = msg.from_peer.as_ref().map_or(0, |p| p.id);
                tracing::trace!(
                    tag = %self.tag,
                    from,
                    leader = self.leader_id(),
                    term = msg.term,
                    my_term = self.term(),
                    last = msg.last_index,
                    my_last = self.raft_group.raft.raft_log.last_index(),
                    "hibernate request"
                );
                if !self.is_leader()
                    && from == self.leader_id()
                    && msg.term == self.term()
                    && msg.last_index == self.raft_group.raft.raft_log.last_index()
                    && ctx.cfg.hibernate_regions
                {
                    self.hibernating = true;
                    ctx.set_awake(self.region_id, false);
                }
            }
            ExtraMessageType::WakeUp => self.wake(ctx),
            ExtraMessageType::None => {}
        }
    }

    /// Everything replicated, applied and quiet: safe to stop ticking. `Err` says why not.
    fn idle_check(&self, ctx: &StoreContext<E>) -> std::result::Result<(), &'static str> {
        if !self.is_leader() {
            return Err("not leader");
        }
        if !self.proposals.is_empty()
            || !self.pending_reads.is_empty()
            || !self.inflight_reads.is_empty()
        {
            return Err("requests pending");
        }
        let raft = &self.raft_group.raft;
        let last = raft.raft_log.last_index();
        if raft.raft_log.committed != last {
            return Err("uncommitted entries");
        }
        if self.applied_index != last {
            return Err("unapplied entries");
        }
        if raft.lead_transferee.is_some() {
            return Err("leader transfer");
        }
        if raft.has_pending_conf() {
            return Err("pending conf change");
        }
        // Followers that are up to date and heard from recently may sleep with it. A silent
        // follower on a store that is down does not keep the region awake (it cannot be
        // helped, and a dead store must not cost every region it hosted a ticking leader):
        // the region sleeps if the up-to-date followers and this leader form a quorum.
        let fresh = ctx.cfg.tick() * (2 * ctx.cfg.raft_election_timeout_ticks as u32);
        let now = Instant::now();
        let mut up_to_date = vec![self.meta.id];
        for (id, pr) in raft.prs().iter() {
            if *id == self.meta.id {
                continue;
            }
            let heard = self
                .peer_heartbeats
                .get(id)
                .is_some_and(|t| now.duration_since(*t) < fresh);
            if pr.matched == last && heard {
                up_to_date.push(*id);
                continue;
            }
            let store_down = self
                .peer_cache
                .get(id)
                .is_some_and(|p| ctx.liveness.is_down(p.store_id));
            if !store_down {
                return Err(if pr.matched != last {
                    "follower behind"
                } else {
                    "follower silent"
                });
            }
        }
        // Joint consensus is not used: the voters are the region's non-learner peers.
        let voters: Vec<u64> = self
            .region()
            .peers
            .iter()
            .filter(|p| !util::is_learner(p))
            .map(|p| p.id)
            .collect();
        let live = voters.iter().filter(|v| up_to_date.contains(v)).count();
        if live <= voters.len() / 2 {
            return Err("no up-to-date quorum");
        }
        Ok(())
    }

    fn maybe_hibernate(&mut self, ctx: &StoreContext<E>) {
        if !ctx.cfg.hibernate_regions || self.hibernating {
            return;
        }
        let idle = self.idle_check(ctx);
        if let Err(why) = idle {
            tracing::trace!(tag = %self.tag, why, "not idle");
        }
        if idle.is_ok() {
            self.idle_ticks += 1;
            if self.idle_ticks >= ctx.cfg.hibernate_after_ticks {
                // Compact what is replicated before going quiet (only worthwhile amounts:
                // the compaction is itself an entry).
                let truncated = self.raft_group.store().truncated_index();
                if self.applied_index.saturating_sub(truncated) >= ctx.cfg.raft_log_gc_threshold {
                    self.maybe_compact_log(ctx, false);
                    self.idle_ticks = 0;
                    return;
                }
                let ids: Vec<u64> = self
                    .raft_group
                    .raft
                    .prs()
                    .iter()
                    .map(|(id, _)| *id)
                    .filter(|id| *id != self.meta.id)
                    .collect();
                for id in ids {
                    self.send_extra(ctx, id, ExtraMessageType::Hibernate);
                }
                self.hibernating = true;
                tracing::trace!(tag = %self.tag, "leader hibernates");
                ctx.set_awake(self.region_id, false);
            }
        } else {
            self.idle_ticks = 0;
        }
    }

    // ---------------- ticks ----------------

    pub fn on_tick(&mut self, ctx: &StoreContext<E>) {
        if self.hibernating || self.pending_remove {
            return;
        }
        self.ticks += 1;
        self.raft_group.tick();
        if self.is_leader() {
            self.retry_stale_reads(ctx);
            if self
                .ticks
                .is_multiple_of(ctx.cfg.raft_log_gc_tick_ticks as u64)
            {
                self.maybe_compact_log(ctx, false);
            }
            self.maybe_hibernate(ctx);
            self.leader_missing_since = None;
        } else {
            if self.leader_id() == raft::INVALID_ID {
                let since = *self.leader_missing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= ctx.cfg.abnormal_leader_missing_duration.0 {
                    self.request_validation(ctx);
                }
            } else {
                self.leader_missing_since = None;
            }
            // A follower that is not a voter of its own view, or has no peers, never leads:
            // nothing else to do.
        }
    }

    /// Asks PD whether this peer is still a member (rate-limited).
    pub fn request_validation(&mut self, ctx: &StoreContext<E>) {
        let due = self
            .last_validate
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if due {
            self.last_validate = Some(Instant::now());
            ctx.schedule_pd(crate::pd_worker::PdTask::ValidatePeer {
                region: self.region().clone(),
                peer: self.meta,
            });
        }
    }

    // ---------------- raft messages ----------------

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

    /// A snapshot may only be accepted if its range overlaps no other region of this store.
    fn check_snapshot(&mut self, ctx: &StoreContext<E>, m: &eraftpb::Message) -> bool {
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
                let _ = ctx.router.force_send(
                    id,
                    crate::msg::PeerMsg::Casual(crate::msg::CasualMessage::HeartbeatPd),
                );
            }
            ctx.metrics.on_dropped("snapshot_overlap");
            return false;
        }
        true
    }

    /// Heart beats that carry nothing new need not wake a hibernating peer: the leader's
    /// last heartbeat (which may cross its hibernate message) and the answers to it.
    fn is_hibernation_safe(&self, m: &eraftpb::Message) -> bool {
        let raft = &self.raft_group.raft;
        if m.term != raft.term {
            return false;
        }
        match m.get_msg_type() {
            MessageType::MsgHeartbeat => {
                !self.is_leader() && m.from == raft.leader_id && m.commit <= raft.raft_log.committed
            }
            MessageType::MsgHeartbeatResponse => {
                self.is_leader()
                    && raft
                        .prs()
                        .get(m.from)
                        .is_some_and(|p| p.matched == raft.raft_log.last_index())
            }
            _ => false,
        }
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
        let region = self.raft_group.store().region.clone();
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
                region_id: self.region_id,
                from_peer: Some(self.meta),
                to_peer: Some(to_peer),
                region_epoch: region.region_epoch,
                start_key: region.start_key.clone(),
                end_key: region.end_key.clone(),
                message: bytes,
                ..Default::default()
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

    // ---------------- proposals ----------------

    fn check_header(&self, ctx: &StoreContext<E>, header: &RaftRequestHeader) -> Result<()> {
        if header.region_id != self.region_id {
            return Err(Error::RegionNotFound(header.region_id));
        }
        if let Some(p) = &header.peer {
            if p.store_id != 0 && p.store_id != ctx.store_id {
                return Err(Error::StoreNotMatch {
                    request_store_id: p.store_id,
                    actual_store_id: ctx.store_id,
                });
            }
        }
        if !self.is_initialized() {
            return Err(Error::RegionNotInitialized(self.region_id));
        }
        Ok(())
    }

    pub fn propose(&mut self, ctx: &StoreContext<E>, mut cmd: RaftCmdRequest, cb: WriteCallback) {
        if let Err(e) = self.propose_inner(ctx, &mut cmd, cb) {
            // propose_inner hands the callback on unless it failed before that.
            if let Some(cb) = e.1 {
                cb(Err(e.0));
            }
        }
    }

    fn propose_inner(
        &mut self,
        ctx: &StoreContext<E>,
        cmd: &mut RaftCmdRequest,
        cb: WriteCallback,
    ) -> std::result::Result<(), (Error, Option<WriteCallback>)> {
        let header = cmd.header.clone().unwrap_or_default();
        if self.pending_remove {
            return Err((Error::RegionNotFound(self.region_id), Some(cb)));
        }
        if let Err(e) = self.check_header(ctx, &header) {
            return Err((e, Some(cb)));
        }
        if !self.is_leader() {
            self.wake_if_asked_to_lead(ctx);
            return Err((self.not_leader(), Some(cb)));
        }
        self.wake(ctx);
        let admin = cmd.admin_request.clone();
        let region = self.region().clone();
        match admin
            .as_ref()
            .map(|a| AdminCmdType::try_from(a.cmd_type).unwrap_or(AdminCmdType::InvalidAdmin))
        {
            Some(AdminCmdType::TransferLeader) => {
                if let Err(e) = check_epoch(&region, header.region_epoch.as_ref(), true, true) {
                    return Err((e, Some(cb)));
                }
                let target = admin
                    .and_then(|a| a.transfer_leader)
                    .and_then(|t| t.peer)
                    .unwrap_or_default();
                if util::find_peer_by_id(&region, target.id).is_none() {
                    return Err((
                        Error::InvalidRequest(format!(
                            "peer {} is not in region {}",
                            target.id, region.id
                        )),
                        Some(cb),
                    ));
                }
                ctx.metrics.on_proposal("transfer_leader");
                self.forbid_lease();
                self.raft_group.transfer_leader(target.id);
                cb(Ok(WriteResponse::default()));
                Ok(())
            }
            Some(AdminCmdType::ChangePeer) => {
                if let Err(e) = check_epoch(&region, header.region_epoch.as_ref(), false, true) {
                    return Err((e, Some(cb)));
                }
                let cp = admin.and_then(|a| a.change_peer).unwrap_or_default();
                let peer = cp.peer.unwrap_or_default();
                let kind = atoll_proto::raft_cmdpb::ConfChangeType::try_from(cp.change_type)
                    .unwrap_or(atoll_proto::raft_cmdpb::ConfChangeType::AddNode);
                if let Err(e) = self.check_conf_change(&region, kind, &peer) {
                    return Err((e, Some(cb)));
                }
                let mut cc = ConfChange::default();
                cc.set_change_type(match kind {
                    atoll_proto::raft_cmdpb::ConfChangeType::AddNode => ConfChangeType::AddNode,
                    atoll_proto::raft_cmdpb::ConfChangeType::RemoveNode => {
                        ConfChangeType::RemoveNode
                    }
                    atoll_proto::raft_cmdpb::ConfChangeType::AddLearnerNode => {
                        ConfChangeType::AddLearnerNode
                    }
                });
                cc.node_id = peer.id;
                cc.context = prost::Message::encode_to_vec(cmd).into();
                let last = self.raft_group.raft.raft_log.last_index();
                if let Err(e) = self.raft_group.propose_conf_change(vec![], cc) {
                    return Err((Error::Other(format!("propose conf change: {e}")), Some(cb)));
                }
                let index = self.raft_group.raft.raft_log.last_index();
                if index == last {
                    return Err((self.not_leader(), Some(cb)));
                }
                // Before the entry leaves (the ready sends it later this round).
                self.block_lease_until(index);
                // The peer must be addressable before it exists anywhere.
                self.peer_cache.insert(peer.id, peer);
                ctx.metrics.on_proposal("conf_change");
                self.proposals.push_back(Proposal {
                    index,
                    term: self.term(),
                    proposed_at: Instant::now(),
                    cb,
                });
                Ok(())
            }
            other => {
                let check_conf = matches!(other, Some(AdminCmdType::BatchSplit));
                if let Err(e) = check_epoch(&region, header.region_epoch.as_ref(), true, check_conf)
                {
                    return Err((e, Some(cb)));
                }
                if matches!(other, Some(AdminCmdType::BatchSplit)) {
                    if let Err(e) = validate_split(&region, cmd) {
                        return Err((e, Some(cb)));
                    }
                }
                let data = prost::Message::encode_to_vec(cmd);
                if data.len() as u64 > ctx.cfg.raft_entry_max_size.0 {
                    return Err((
                        Error::RaftEntryTooLarge {
                            region_id: self.region_id,
                            entry_size: data.len() as u64,
                        },
                        Some(cb),
                    ));
                }
                let last = self.raft_group.raft.raft_log.last_index();
                if let Err(e) = self.raft_group.propose(vec![], data) {
                    let err = match e {
                        raft::Error::ProposalDropped => self.not_leader(),
                        e => Error::Other(format!("propose: {e}")),
                    };
                    return Err((err, Some(cb)));
                }
                let index = self.raft_group.raft.raft_log.last_index();
                if index == last {
                    return Err((self.not_leader(), Some(cb)));
                }
                if matches!(other, Some(AdminCmdType::BatchSplit)) {
                    // Before the entry leaves (the ready sends it later this round).
                    self.block_lease_until(index);
                }
                ctx.metrics
                    .on_proposal(if other.is_some() { "admin" } else { "write" });
                self.proposals.push_back(Proposal {
                    index,
                    term: self.term(),
                    proposed_at: Instant::now(),
                    cb,
                });
                Ok(())
            }
        }
    }

    fn check_conf_change(
        &self,
        region: &metapb::Region,
        kind: atoll_proto::raft_cmdpb::ConfChangeType,
        peer: &metapb::Peer,
    ) -> Result<()> {
        use atoll_proto::raft_cmdpb::ConfChangeType as T;
        if peer.id == 0 || peer.store_id == 0 {
            return Err(Error::InvalidRequest(
                "conf change needs a peer id and a store id".into(),
            ));
        }
        if self.raft_group.raft.has_pending_conf() {
            return Err(Error::ServerIsBusy(format!(
                "region {} has a pending conf change",
                region.id
            )));
        }
        let existing = util::find_peer_by_id(region, peer.id);
        let on_store = util::find_peer(region, peer.store_id);
        match kind {
            T::AddNode | T::AddLearnerNode => {
                if let Some(p) = on_store {
                    if p.id != peer.id {
                        return Err(Error::InvalidRequest(format!(
                            "store {} already has peer {} of region {}",
                            peer.store_id, p.id, region.id
                        )));
                    }
                }
                if kind == T::AddLearnerNode && existing.is_some() {
                    return Err(Error::InvalidRequest(format!(
                        "peer {} already in region {}",
                        peer.id, region.id
                    )));
                }
                if kind == T::AddNode && existing.is_some_and(|p| !util::is_learner(p)) {
                    return Err(Error::InvalidRequest(format!(
                        "peer {} is already a voter",
                        peer.id
                    )));
                }
            }
            T::RemoveNode => {
                if existing.is_none() {
                    return Err(Error::InvalidRequest(format!(
                        "peer {} not in region {}",
                        peer.id, region.id
                    )));
                }
                if peer.id == self.meta.id {
                    return Err(Error::InvalidRequest(
                        "the leader cannot remove itself; transfer leadership first".into(),
                    ));
                }
                let voters = region.peers.iter().filter(|p| !util::is_learner(p)).count();
                if existing.is_some_and(|p| !util::is_learner(p)) && voters <= 1 {
                    return Err(Error::InvalidRequest("cannot remove the last voter".into()));
                }
            }
        }
        Ok(())
    }

    // ---------------- reads ----------------

    pub fn read_index(
        &mut self,
        ctx: &StoreContext<E>,
        header: &RaftRequestHeader,
        cb: ReadCallback<E::Snapshot>,
    ) {
        if self.pending_remove {
            return cb(Err(Error::RegionNotFound(self.region_id)));
        }
        if let Err(e) = self.check_header(ctx, header) {
            return cb(Err(e));
        }
        if !self.is_leader() {
            self.wake_if_asked_to_lead(ctx);
            return cb(Err(self.not_leader()));
        }
        if let Err(e) = check_epoch(self.region(), header.region_epoch.as_ref(), true, false) {
            return cb(Err(e));
        }
        self.wake(ctx);
        self.pending_reads
            .push((header.region_epoch.unwrap_or_default(), cb));
    }

    /// Issues one read index request for every read queued this round (once the leader has
    /// committed an entry of its term; raft-rs drops read requests before that).
    pub fn maybe_issue_reads(&mut self, ctx: &StoreContext<E>) {
        if self.pending_reads.is_empty()
            || !self.is_leader()
            || !self.raft_group.raft.commit_to_current_term()
        {
            return;
        }
        let id = ctx.next_read_id();
        self.raft_group.read_index(id.to_be_bytes().to_vec());
        let reads = std::mem::take(&mut self.pending_reads);
        self.inflight_reads.push_back(ReadBatch {
            id,
            index: None,
            issued_tick: self.ticks,
            issued_at: Instant::now(),
            reads,
        });
    }

    fn retry_stale_reads(&mut self, ctx: &StoreContext<E>) {
        let timeout = ctx.cfg.raft_election_timeout_ticks as u64;
        let ticks = self.ticks;
        let mut reissue = vec![];
        for b in self.inflight_reads.iter_mut() {
            if b.index.is_none() && ticks.saturating_sub(b.issued_tick) >= timeout {
                b.id = ctx.next_read_id();
                b.issued_tick = ticks;
                b.issued_at = Instant::now();
                reissue.push(b.id);
            }
        }
        if self.raft_group.raft.commit_to_current_term() {
            for id in reissue {
                self.raft_group.read_index(id.to_be_bytes().to_vec());
            }
        }
    }

    fn on_read_state(&mut self, ctx: &StoreContext<E>, ctx_bytes: &[u8], index: u64) {
        let Ok(id) = <[u8; 8]>::try_from(ctx_bytes).map(u64::from_be_bytes) else {
            return;
        };
        let mut confirmed_at = None;
        if let Some(b) = self.inflight_reads.iter_mut().find(|b| b.id == id) {
            b.index = Some(index);
            confirmed_at = Some(b.issued_at);
        }
        // A quorum answered a heartbeat sent after the read was requested.
        if let Some(at) = confirmed_at {
            self.renew_lease(ctx, at);
        }
    }

    // ---------------- the leader lease ----------------

    /// Extends the lease to `from + raft-max-leader-lease`: a quorum acknowledged a message
    /// this leader sent at or after `from`, and each of its members refuses to vote for anyone
    /// else for an election timeout after hearing from its leader (`check_quorum`; a
    /// restarted store: [`Self::holds_vote`]).
    fn renew_lease(&mut self, ctx: &StoreContext<E>, from: Instant) {
        let len = ctx.cfg.max_leader_lease();
        if len.is_zero()
            || !self.is_leader()
            || self.lease_term != self.term()
            || self.no_lease_term == self.term()
            || self.applied_index < self.lease_blocked_until
            || self.raft_group.raft.lead_transferee.is_some()
        {
            return;
        }
        self.lease.renew(from, len);
    }

    /// No lease for the rest of this term.
    fn forbid_lease(&mut self) {
        self.no_lease_term = self.term();
        self.lease.expire();
    }

    /// No lease until the entry at `index` (a split or membership change) is applied.
    fn block_lease_until(&mut self, index: u64) {
        self.lease_blocked_until = self.lease_blocked_until.max(index);
        self.lease.expire();
    }

    /// Answers reads whose read index is applied.
    pub fn serve_reads(&mut self, ctx: &StoreContext<E>) {
        if !self.is_leader() {
            return;
        }
        let mut snap: Option<E::Snapshot> = None;
        while let Some(b) = self.inflight_reads.front() {
            match b.index {
                Some(i) if i <= self.applied_index => {}
                _ => break,
            }
            let b = self.inflight_reads.pop_front().expect("front exists");
            let s = snap.get_or_insert_with(|| ctx.engine.snapshot()).clone();
            let region = Arc::new(self.region().clone());
            for (epoch, cb) in b.reads {
                let resp = match check_epoch(&region, Some(&epoch), true, false) {
                    Ok(()) => Ok(RegionSnapshot {
                        snap: s.clone(),
                        region: region.clone(),
                        applied_index: self.applied_index,
                        term: self.term(),
                    }),
                    Err(e) => Err(e),
                };
                cb(resp);
            }
        }
    }

    pub fn fail_reads(&mut self, err: &Error) {
        for (_, cb) in self.pending_reads.drain(..) {
            cb(Err(err.clone()));
        }
        for b in self.inflight_reads.drain(..) {
            for (_, cb) in b.reads {
                cb(Err(err.clone()));
            }
        }
    }

    pub fn fail_proposals(&mut self, err: &Error) {
        for p in self.proposals.drain(..) {
            (p.cb)(Err(err.clone()));
        }
    }

    // ---------------- log compaction ----------------

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
        let region = self.region().clone();
        let cmd = RaftCmdRequest {
            header: Some(RaftRequestHeader {
                region_id: self.region_id,
                peer: Some(self.meta),
                region_epoch: region.region_epoch,
                keys: vec![],
            }),
            requests: vec![],
            admin_request: Some(atoll_proto::raft_cmdpb::AdminRequest {
                cmd_type: AdminCmdType::CompactLog as i32,
                compact_log: Some(atoll_proto::raft_cmdpb::CompactLogRequest {
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

    // ---------------- the Ready cycle ----------------

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

    /// Tells the store (and through it the KV service) who leads and whether it is ready.
    pub fn publish(&mut self, ctx: &StoreContext<E>) {
        let term = if self.is_leader() { self.term() } else { 0 };
        if self.lease_term != term {
            // A new leadership (or none): the old lease ends, the new one starts expired.
            self.lease.expire();
            self.lease = Arc::new(LeaderLease::new());
            self.lease_term = term;
        }
        let ready = self.leader_ready();
        let leader = self.leader().map(|p| p.id);
        let now = Some((term, ready, leader));
        if self.published == now {
            return;
        }
        self.published = now;
        let mut meta = ctx.meta.lock();
        let d = crate::meta::ReadDelegate {
            region: Arc::new(self.region().clone()),
            peer: self.meta,
            term,
            leader_ready: ready,
            leader: self.leader(),
            lease: self.lease.clone(),
            approximate_size: self.approximate_size.unwrap_or(0),
            approximate_keys: self.approximate_keys.unwrap_or(0),
        };
        meta.readers.insert(self.region_id, d);
    }

    /// Republishes after a region change.
    pub fn republish(&mut self, ctx: &StoreContext<E>) {
        self.published = None;
        self.publish(ctx);
    }

    pub fn heartbeat_pd(&mut self, ctx: &StoreContext<E>) {
        if !self.is_leader() || !self.is_initialized() {
            return;
        }
        let now = Instant::now();
        let down_after = ctx.cfg.max_peer_down_duration.0;
        let mut down_peers = vec![];
        let mut pending_peers = vec![];
        let truncated = self.raft_group.store().truncated_index();
        for p in &self.region().peers {
            if p.id == self.meta.id {
                continue;
            }
            // A peer is down when its whole store is (store-level liveness), or, while the
            // region is awake, when the peer itself has been silent. Asleep nobody speaks,
            // so silence alone says nothing.
            let store_silent = ctx.liveness.down_for(p.store_id, now);
            let peer_silent = if self.hibernating {
                None
            } else {
                self.peer_heartbeats
                    .get(&p.id)
                    .map(|t| now.duration_since(*t))
            };
            let silent = store_silent.max(peer_silent);
            if let Some(d) = silent {
                if d >= down_after {
                    down_peers.push(atoll_proto::pdpb::PeerStats {
                        peer: Some(*p),
                        down_seconds: d.as_secs(),
                    });
                }
            }
            if let Some(pr) = self.raft_group.raft.prs().get(p.id) {
                if pr.matched < truncated {
                    pending_peers.push(*p);
                }
            }
        }
        let req = atoll_proto::pdpb::RegionHeartbeatRequest {
            header: None,
            region: Some(self.region().clone()),
            leader: Some(self.meta),
            down_peers,
            pending_peers,
            bytes_written: std::mem::take(&mut self.written_bytes),
            keys_written: std::mem::take(&mut self.written_keys),
            bytes_read: 0,
            keys_read: 0,
            approximate_size: self.approximate_size.unwrap_or(0),
            approximate_keys: self.approximate_keys.unwrap_or(0),
            term: self.term(),
            interval_secs: ctx.cfg.pd_heartbeat_interval.0.as_secs(),
        };
        ctx.schedule_pd(crate::pd_worker::PdTask::Heartbeat(Box::new(req)));
    }
}

fn validate_split(region: &metapb::Region, cmd: &RaftCmdRequest) -> Result<()> {
    let splits = cmd
        .admin_request
        .as_ref()
        .and_then(|a| a.splits.as_ref())
        .ok_or_else(|| Error::InvalidRequest("batch split without splits".into()))?;
    if splits.requests.is_empty() {
        return Err(Error::InvalidRequest(
            "batch split without split keys".into(),
        ));
    }
    let mut prev: &[u8] = &region.start_key;
    for s in &splits.requests {
        if s.split_key.is_empty() {
            return Err(Error::InvalidRequest("empty split key".into()));
        }
        if s.split_key.as_slice() <= prev {
            return Err(Error::InvalidRequest(format!(
                "split keys must be sorted and inside region {}",
                region.id
            )));
        }
        util::check_key_in_region(&s.split_key, region)?;
        if s.new_peer_ids.len() != region.peers.len() {
            return Err(Error::InvalidRequest(
                "split needs one new peer id per peer".into(),
            ));
        }
        prev = &s.split_key;
    }
    Ok(())
}
