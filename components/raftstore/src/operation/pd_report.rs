//! PD reporting: region heartbeats from leaders (with down and pending peers and the written
//! bytes since the last one), membership checks of peers that suspect they were removed, and
//! the operator steps PD answers with (conf change, leader transfer, split).

use crate::fsm::context::StoreContext;
use crate::fsm::peer::PeerFsm;
use crate::msg::WriteCallback;
use crate::operation::conf_change;
use crate::raft::peer::Peer;
use crate::task::PdTask;
use crate::util;
use atoll_engine::KvEngine;
use atoll_proto::pdpb;
use atoll_proto::raft_cmdpb::{
    AdminCmdType, AdminRequest, ChangePeerRequest, ConfChangeType as CmdConfChangeType,
    RaftCmdRequest,
};
use std::time::{Duration, Instant};

impl<E: KvEngine> Peer<E> {
    /// Asks PD whether this peer is still a member (rate-limited).
    pub fn request_validation(&mut self, ctx: &StoreContext<E>) {
        let due = self
            .last_validate
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if due {
            self.last_validate = Some(Instant::now());
            ctx.schedule_pd(PdTask::ValidatePeer {
                region: self.region().clone(),
                peer: self.meta,
            });
        }
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
                    down_peers.push(pdpb::PeerStats {
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
        let req = pdpb::RegionHeartbeatRequest {
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
        ctx.schedule_pd(PdTask::Heartbeat(Box::new(req)));
    }
}

impl<E: KvEngine> PeerFsm<E> {
    pub(crate) fn on_pd_operator(
        &mut self,
        ctx: &StoreContext<E>,
        resp: pdpb::RegionHeartbeatResponse,
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
            let Some(change_type) = conf_change::cmd_type_of_pd(cp.change_type) else {
                return;
            };
            let peer = cp.peer.unwrap_or_default();
            // Removing the leader itself: hand leadership to another voter first.
            if change_type == CmdConfChangeType::RemoveNode && peer.id == self.peer.meta.id {
                if let Some(target) = self.pick_transfer_target() {
                    self.peer.raft_group.transfer_leader(target);
                }
                return;
            }
            let cmd = RaftCmdRequest {
                header: Some(self.peer.header()),
                requests: vec![],
                admin_request: Some(AdminRequest {
                    cmd_type: AdminCmdType::ChangePeer as i32,
                    change_peer: Some(ChangePeerRequest {
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
                self.ask_split(ctx, &epoch, sr.keys, None);
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

    /// Leader: a region heartbeat now. Follower (asked by the store: this peer blocks a
    /// range): is it still a member?
    pub(crate) fn on_heartbeat_pd(&mut self, ctx: &StoreContext<E>) {
        if self.peer.is_leader() {
            self.peer.heartbeat_pd(ctx);
        } else {
            self.peer.request_validation(ctx);
        }
    }
}
