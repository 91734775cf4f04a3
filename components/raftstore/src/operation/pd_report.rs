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

    /// Reports the region to PD now.
    pub fn heartbeat_pd(&mut self, ctx: &StoreContext<E>) {
        self.report_to_pd(ctx, true);
    }

    /// Reports the region to PD if `force`, or if PD's view of it is out of date: something
    /// PD schedules by changed (see [`PdReport::differs`]), or the last report is older than
    /// `pd-heartbeat-max-interval`. An idle region costs PD nothing between those.
    pub fn report_to_pd(&mut self, ctx: &StoreContext<E>, force: bool) {
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
        let report = PdReport {
            term: self.term(),
            region: self.region().clone(),
            down_peers: down_peers
                .iter()
                .filter_map(|d| d.peer.map(|p| p.id))
                .collect(),
            pending_peers: pending_peers.iter().map(|p| p.id).collect(),
            approximate_size: self.approximate_size.unwrap_or(0),
            approximate_keys: self.approximate_keys.unwrap_or(0),
        };
        let due = force
            || self.written_bytes >= REPORT_WRITTEN_BYTES
            || self.written_keys >= REPORT_WRITTEN_KEYS
            || match &self.last_pd_report {
                None => true,
                Some((last, at)) => {
                    last.differs(&report) || at.elapsed() >= ctx.cfg.pd_heartbeat_max_interval.0
                }
            };
        if !due {
            return;
        }
        // The period the written figures cover.
        let since_last = self
            .last_pd_report
            .as_ref()
            .map_or(ctx.cfg.pd_heartbeat_interval.0, |(_, at)| {
                now.duration_since(*at)
            });
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
            interval_secs: since_last.as_secs().max(1),
        };
        // Remembered only once handed on: a report dropped here goes out at the next check.
        if ctx.schedule_pd(PdTask::Heartbeat(Box::new(req))) {
            self.last_pd_report = Some((report, now));
        }
    }
}

/// Written bytes or keys since the last report that make the next periodic check report.
const REPORT_WRITTEN_BYTES: u64 = 4 << 20;
const REPORT_WRITTEN_KEYS: u64 = 10_000;

/// What a region heartbeat told PD: the parts PD routes and schedules by.
#[derive(Clone, Debug, PartialEq)]
pub struct PdReport {
    pub term: u64,
    pub region: atoll_proto::metapb::Region,
    pub down_peers: Vec<u64>,
    pub pending_peers: Vec<u64>,
    pub approximate_size: u64,
    pub approximate_keys: u64,
}

impl PdReport {
    /// Whether PD should hear `now`: a new term, epoch, range or peer set, other down or
    /// pending peers, or size or keys moved by more than an eighth (and more than 1 MiB /
    /// 1,000 keys: small regions do not chatter).
    pub fn differs(&self, now: &PdReport) -> bool {
        fn moved(a: u64, b: u64, floor: u64) -> bool {
            a.abs_diff(b) > (a / 8).max(floor)
        }
        self.term != now.term
            || self.region != now.region
            || self.down_peers != now.down_peers
            || self.pending_peers != now.pending_peers
            || moved(self.approximate_size, now.approximate_size, 1 << 20)
            || moved(self.approximate_keys, now.approximate_keys, 1_000)
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
                if let Some(target) = self.pick_transfer_target(ctx) {
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
                // Not to a peer on a store this store takes as down: PD learns of a dead store
                // only after its disconnect time and may still pick it, and while a transfer
                // is pending the region takes no proposal (until an election timeout, again
                // at every heartbeat PD answers with the same step).
                let target_down = util::find_peer_by_id(self.peer.region(), p.id)
                    .is_some_and(|t| ctx.liveness.is_down(t.store_id));
                if target_down {
                    tracing::debug!(
                        region_id = self.peer.region().id,
                        target_store = p.store_id,
                        "leader transfer to a peer on a down store refused"
                    );
                } else if p.id != self.peer.meta.id
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

    fn pick_transfer_target(&self, ctx: &StoreContext<E>) -> Option<u64> {
        let last = self.peer.raft_group.raft.raft_log.last_index();
        self.peer
            .region()
            .peers
            .iter()
            .filter(|p| {
                p.id != self.peer.meta.id
                    && !util::is_learner(p)
                    && !ctx.liveness.is_down(p.store_id)
            })
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

    /// Leader: a region heartbeat now (`force`), or if PD's view is out of date. Follower
    /// (asked by the store: this peer blocks a range): is it still a member?
    pub(crate) fn on_heartbeat_pd(&mut self, ctx: &StoreContext<E>, force: bool) {
        if self.peer.is_leader() {
            self.peer.report_to_pd(ctx, force);
        } else {
            self.peer.request_validation(ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PdReport;
    use atoll_proto::metapb;

    fn report() -> PdReport {
        PdReport {
            term: 5,
            region: metapb::Region {
                id: 1,
                region_epoch: Some(metapb::RegionEpoch {
                    conf_ver: 2,
                    version: 3,
                }),
                ..Default::default()
            },
            down_peers: vec![],
            pending_peers: vec![],
            approximate_size: 64 << 20,
            approximate_keys: 100_000,
        }
    }

    #[test]
    fn only_what_pd_schedules_by_makes_a_report() {
        let a = report();
        assert!(!a.differs(&a.clone()));
        // Size and keys: within an eighth is noise, beyond it news.
        let small = PdReport {
            approximate_size: (64 << 20) + (7 << 20),
            approximate_keys: 110_000,
            ..a.clone()
        };
        assert!(!a.differs(&small));
        let grown = PdReport {
            approximate_size: 80 << 20,
            ..a.clone()
        };
        assert!(a.differs(&grown));
        let more_keys = PdReport {
            approximate_keys: 120_000,
            ..a.clone()
        };
        assert!(a.differs(&more_keys));
        // A tiny region does not report every few keys.
        let tiny = PdReport {
            approximate_size: 10_000,
            approximate_keys: 10,
            ..a.clone()
        };
        let tiny2 = PdReport {
            approximate_size: 500_000,
            approximate_keys: 900,
            ..tiny.clone()
        };
        assert!(!tiny.differs(&tiny2));
        // Term, epoch, down and pending peers always.
        assert!(a.differs(&PdReport {
            term: 6,
            ..a.clone()
        }));
        let mut split = a.clone();
        split.region.region_epoch.as_mut().unwrap().version = 4;
        assert!(a.differs(&split));
        assert!(a.differs(&PdReport {
            down_peers: vec![7],
            ..a.clone()
        }));
        assert!(a.differs(&PdReport {
            pending_peers: vec![7],
            ..a.clone()
        }));
    }
}
