//! Operators: a region's change as a list of steps (add learner, promote, remove peer,
//! transfer leader), delivered one at a time to the region's leader and checked against
//! later heartbeats. An operator is dropped when it finishes, when the region moves in a way
//! it did not expect, or when it times out.

use atoll_proto::{metapb, pdpb};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpStep {
    AddLearner { store_id: u64, peer_id: u64 },
    PromoteLearner { store_id: u64, peer_id: u64 },
    RemovePeer { store_id: u64, peer_id: u64 },
    TransferLeader { from_store: u64, to_store: u64 },
}

fn peer_on(region: &metapb::Region, store_id: u64) -> Option<&metapb::Peer> {
    region.peers.iter().find(|p| p.store_id == store_id)
}

fn is_learner(p: &metapb::Peer) -> bool {
    p.role == metapb::PeerRole::Learner as i32
}

impl OpStep {
    /// Whether the region (as last reported) shows this step done.
    pub fn is_finished(&self, region: &metapb::Region, leader: Option<&metapb::Peer>) -> bool {
        match self {
            OpStep::AddLearner { store_id, peer_id } => {
                peer_on(region, *store_id).is_some_and(|p| p.id == *peer_id)
            }
            OpStep::PromoteLearner { store_id, peer_id } => {
                peer_on(region, *store_id).is_some_and(|p| p.id == *peer_id && !is_learner(p))
            }
            OpStep::RemovePeer { store_id, .. } => peer_on(region, *store_id).is_none(),
            OpStep::TransferLeader { to_store, .. } => {
                leader.is_some_and(|l| l.store_id == *to_store)
            }
        }
    }

    /// The heartbeat response that asks the leader to do this step.
    pub fn to_response(&self, region: &metapb::Region) -> pdpb::RegionHeartbeatResponse {
        let mut r = pdpb::RegionHeartbeatResponse {
            region_id: region.id,
            region_epoch: region.region_epoch,
            ..Default::default()
        };
        match self {
            OpStep::AddLearner { store_id, peer_id } => {
                r.change_peer = Some(pdpb::ChangePeer {
                    peer: Some(metapb::Peer {
                        id: *peer_id,
                        store_id: *store_id,
                        role: metapb::PeerRole::Learner as i32,
                    }),
                    change_type: pdpb::ConfChangeType::AddLearnerNode as i32,
                })
            }
            OpStep::PromoteLearner { store_id, peer_id } => {
                r.change_peer = Some(pdpb::ChangePeer {
                    peer: Some(metapb::Peer {
                        id: *peer_id,
                        store_id: *store_id,
                        role: metapb::PeerRole::Voter as i32,
                    }),
                    change_type: pdpb::ConfChangeType::AddNode as i32,
                })
            }
            OpStep::RemovePeer { store_id, peer_id } => {
                r.change_peer = Some(pdpb::ChangePeer {
                    peer: Some(metapb::Peer {
                        id: *peer_id,
                        store_id: *store_id,
                        role: 0,
                    }),
                    change_type: pdpb::ConfChangeType::RemoveNode as i32,
                })
            }
            OpStep::TransferLeader { to_store, .. } => {
                r.transfer_leader = Some(pdpb::TransferLeader {
                    peer: peer_on(region, *to_store).cloned(),
                })
            }
        }
        r
    }

    /// Stores that receive a new peer (a snapshot) in this step.
    pub fn target_store(&self) -> Option<u64> {
        match self {
            OpStep::AddLearner { store_id, .. } => Some(*store_id),
            _ => None,
        }
    }
}

impl std::fmt::Display for OpStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpStep::AddLearner { store_id, peer_id } => {
                write!(f, "add learner {peer_id} on store {store_id}")
            }
            OpStep::PromoteLearner { store_id, peer_id } => {
                write!(f, "promote learner {peer_id} on store {store_id}")
            }
            OpStep::RemovePeer { store_id, peer_id } => {
                write!(f, "remove peer {peer_id} from store {store_id}")
            }
            OpStep::TransferLeader {
                from_store,
                to_store,
            } => write!(
                f,
                "transfer leader from store {from_store} to store {to_store}"
            ),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    /// Keeps the replica count: highest priority.
    Replica,
    /// Moves peers off an offline store.
    Removal,
    BalanceRegion,
    BalanceLeader,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Replica => "replica",
            OpKind::Removal => "removal",
            OpKind::BalanceRegion => "balance-region",
            OpKind::BalanceLeader => "balance-leader",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpStatus {
    Running(OpStep),
    Finished,
    /// The region changed in a way this operator did not plan for.
    Stale,
}

#[derive(Clone, Debug)]
pub struct Operator {
    pub region_id: u64,
    pub kind: OpKind,
    pub desc: String,
    pub steps: Vec<OpStep>,
    pub current: usize,
    /// The region's epoch when the operator was made, advanced as its own steps land.
    pub conf_ver: u64,
    pub version: u64,
    pub created: Instant,
}

impl Operator {
    pub fn new(
        region: &metapb::Region,
        kind: OpKind,
        desc: impl Into<String>,
        steps: Vec<OpStep>,
    ) -> Self {
        let e = region.region_epoch.unwrap_or_default();
        Operator {
            region_id: region.id,
            kind,
            desc: desc.into(),
            steps,
            current: 0,
            conf_ver: e.conf_ver,
            version: e.version,
            created: Instant::now(),
        }
    }

    /// Advances past finished steps; says what to do next.
    pub fn check(&mut self, region: &metapb::Region, leader: Option<&metapb::Peer>) -> OpStatus {
        let e = region.region_epoch.unwrap_or_default();
        if e.version != self.version {
            // Split or merge: the plan no longer fits.
            return OpStatus::Stale;
        }
        while self.current < self.steps.len()
            && self.steps[self.current].is_finished(region, leader)
        {
            if !matches!(self.steps[self.current], OpStep::TransferLeader { .. }) {
                self.conf_ver += 1;
            }
            self.current += 1;
        }
        if self.current >= self.steps.len() {
            return OpStatus::Finished;
        }
        // Membership moved by more than our own finished steps: someone else changed it.
        if e.conf_ver > self.conf_ver {
            return OpStatus::Stale;
        }
        OpStatus::Running(self.steps[self.current].clone())
    }

    pub fn is_timed_out(&self, timeout: Duration) -> bool {
        self.created.elapsed() > timeout
    }

    /// Stores receiving a snapshot from this operator's remaining steps.
    pub fn pending_targets(&self) -> Vec<u64> {
        self.steps[self.current.min(self.steps.len())..]
            .iter()
            .filter_map(|s| s.target_store())
            .collect()
    }

    pub fn info(&self) -> pdpb::OperatorInfo {
        let steps: Vec<String> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if i == self.current {
                    format!("[{s}]")
                } else {
                    s.to_string()
                }
            })
            .collect();
        pdpb::OperatorInfo {
            region_id: self.region_id,
            kind: self.kind.name().into(),
            desc: format!("{}: {}", self.desc, steps.join(", ")),
            age_ms: self.created.elapsed().as_millis() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(conf_ver: u64, peers: &[(u64, u64, bool)]) -> metapb::Region {
        metapb::Region {
            id: 1,
            region_epoch: Some(metapb::RegionEpoch {
                conf_ver,
                version: 1,
            }),
            peers: peers
                .iter()
                .map(|(id, s, learner)| metapb::Peer {
                    id: *id,
                    store_id: *s,
                    role: if *learner { 1 } else { 0 },
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn follows_its_steps_to_the_end() {
        let r0 = region(1, &[(1, 1, false), (2, 2, false), (3, 3, false)]);
        let mut op = Operator::new(
            &r0,
            OpKind::BalanceRegion,
            "move 1->4",
            vec![
                OpStep::AddLearner {
                    store_id: 4,
                    peer_id: 9,
                },
                OpStep::PromoteLearner {
                    store_id: 4,
                    peer_id: 9,
                },
                OpStep::TransferLeader {
                    from_store: 1,
                    to_store: 2,
                },
                OpStep::RemovePeer {
                    store_id: 1,
                    peer_id: 1,
                },
            ],
        );
        let l1 = metapb::Peer {
            id: 1,
            store_id: 1,
            role: 0,
        };
        assert!(matches!(
            op.check(&r0, Some(&l1)),
            OpStatus::Running(OpStep::AddLearner { .. })
        ));
        let r1 = region(
            2,
            &[(1, 1, false), (2, 2, false), (3, 3, false), (9, 4, true)],
        );
        assert!(matches!(
            op.check(&r1, Some(&l1)),
            OpStatus::Running(OpStep::PromoteLearner { .. })
        ));
        let r2 = region(
            3,
            &[(1, 1, false), (2, 2, false), (3, 3, false), (9, 4, false)],
        );
        assert!(matches!(
            op.check(&r2, Some(&l1)),
            OpStatus::Running(OpStep::TransferLeader { .. })
        ));
        let l2 = metapb::Peer {
            id: 2,
            store_id: 2,
            role: 0,
        };
        assert!(matches!(
            op.check(&r2, Some(&l2)),
            OpStatus::Running(OpStep::RemovePeer { .. })
        ));
        let r3 = region(4, &[(2, 2, false), (3, 3, false), (9, 4, false)]);
        assert_eq!(op.check(&r3, Some(&l2)), OpStatus::Finished);
        let resp = OpStep::TransferLeader {
            from_store: 1,
            to_store: 2,
        }
        .to_response(&r2);
        assert_eq!(resp.transfer_leader.unwrap().peer.unwrap().id, 2);
    }

    #[test]
    fn goes_stale_when_someone_else_moves_the_region() {
        let r0 = region(1, &[(1, 1, false), (2, 2, false)]);
        let mut op = Operator::new(
            &r0,
            OpKind::Replica,
            "add",
            vec![OpStep::AddLearner {
                store_id: 3,
                peer_id: 7,
            }],
        );
        let other = region(2, &[(1, 1, false), (2, 2, false), (8, 4, true)]);
        assert_eq!(op.check(&other, None), OpStatus::Stale);
        let mut split = r0.clone();
        split.region_epoch = Some(metapb::RegionEpoch {
            conf_ver: 1,
            version: 2,
        });
        let mut op2 = Operator::new(
            &r0,
            OpKind::Replica,
            "add",
            vec![OpStep::AddLearner {
                store_id: 3,
                peer_id: 7,
            }],
        );
        assert_eq!(op2.check(&split, None), OpStatus::Stale);
    }
}
