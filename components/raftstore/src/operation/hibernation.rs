//! Hibernation: the per-round tick of an awake peer, and how idle regions stop ticking. A
//! leader with everything replicated, applied and quiet tells its followers to sleep and
//! stops; any message that carries something new (or a client asking a sleeping follower for a
//! leader's work, or a store going down) wakes the group. No thread, task or timer exists per
//! region: only awake regions are in the ticker's set.

use crate::fsm::context::StoreContext;
use crate::msg::PeerMsg;
use crate::raft::peer::Peer;
use crate::util;
use atoll_engine::KvEngine;
use atoll_proto::raft_serverpb::{ExtraMessageType, RaftMessage};
use raft::eraftpb::{self, MessageType};
use std::sync::Arc;
use std::time::Instant;

impl<E: KvEngine> Peer<E> {
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
        let msg = RaftMessage {
            extra: extra as i32,
            term: self.term(),
            last_index: self.raft_group.raft.raft_log.last_index(),
            ..self.raft_message_to(to_peer)
        };
        ctx.trans.send(msg);
    }

    /// Handles a hibernation control message (a leader going to sleep, or a peer waking the group).
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

    /// Heart beats that carry nothing new need not wake a hibernating peer: the leader's
    /// last heartbeat (which may cross its hibernate message) and the answers to it.
    pub(crate) fn is_hibernation_safe(&self, m: &eraftpb::Message) -> bool {
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
}

/// A store went down: the followers here whose leader was there must elect a new one. Awake
/// ones will on their own; sleeping ones are woken, with their groups (once per transition:
/// a store that stays down costs nothing more).
pub fn wake_followers_of<E: KvEngine>(ctx: &Arc<StoreContext<E>>, store_id: u64) {
    let ids: Vec<u64> = ctx
        .meta
        .lock()
        .readers
        .iter()
        .filter(|(_, d)| d.term == 0 && d.leader.is_some_and(|l| l.store_id == store_id))
        .map(|(id, _)| *id)
        .collect();
    tracing::info!(
        store_id,
        regions = ids.len(),
        "waking followers of a down store's leaders"
    );
    for id in ids {
        let _ = ctx.router.force_send(id, PeerMsg::Wake);
    }
}
