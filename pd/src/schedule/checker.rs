//! The replica checker: keeps every region at `max_replicas` voters on distinct schedulable
//! stores. It replaces peers on down or offline stores, adds missing ones, promotes or removes
//! stray learners, and removes extra voters.

use super::operator::{OpKind, OpStep, Operator};
use super::{ClusterSnapshot, IdSource, RegionView, StoreView};

/// The best store to receive a new peer of `r`: schedulable, not already holding one, not
/// over its snapshot limit, fewest regions first.
pub fn pick_target(
    snap: &ClusterSnapshot,
    r: &RegionView,
    max_snapshots: usize,
    exclude: &[u64],
) -> Option<u64> {
    snap.schedulable_stores()
        .into_iter()
        .filter(|s| r.peer_on(s.id).is_none() && !exclude.contains(&s.id))
        .filter(|s| s.pending_snapshots < max_snapshots)
        .min_by_key(|s| (s.region_count, s.id))
        .map(|s| s.id)
}

fn store(snap: &ClusterSnapshot, id: u64) -> Option<&StoreView> {
    snap.stores.get(&id)
}

/// Whether the peer on `store_id` must go: its store is down, offline, tombstone or gone,
/// or its region has reported it down for at least max-store-down-time.
fn is_bad_peer(snap: &ClusterSnapshot, r: &RegionView, store_id: u64, peer_id: u64) -> bool {
    match store(snap, store_id) {
        None => true,
        Some(s) => {
            s.is_down || s.is_offline() || s.is_tombstone() || r.long_down_peers.contains(&peer_id)
        }
    }
}

/// Steps to replace `old` (on `old_store`) with a new voter on `target`; moves leadership away
/// first if `old` leads.
pub fn replace_steps(
    r: &RegionView,
    old_store: u64,
    old_peer: u64,
    target: u64,
    new_peer: u64,
) -> Vec<OpStep> {
    let mut steps = vec![
        OpStep::AddLearner {
            store_id: target,
            peer_id: new_peer,
        },
        OpStep::PromoteLearner {
            store_id: target,
            peer_id: new_peer,
        },
    ];
    if r.leader_store() == Some(old_store) {
        steps.push(OpStep::TransferLeader {
            from_store: old_store,
            to_store: target,
        });
    }
    steps.push(OpStep::RemovePeer {
        store_id: old_store,
        peer_id: old_peer,
    });
    steps
}

pub fn check_replicas(
    snap: &ClusterSnapshot,
    r: &RegionView,
    max_replicas: usize,
    max_snapshots: usize,
    ids: &mut dyn IdSource,
) -> Option<Operator> {
    let leader = r.leader.as_ref()?;
    let voters: Vec<_> = r.voters().cloned().collect();
    // 1. A stray learner (an operator died half-way): promote it if a voter is missing, else drop it.
    if let Some(l) = r.learners().next() {
        let step = if voters.len() < max_replicas && !is_bad_peer(snap, r, l.store_id, l.id) {
            OpStep::PromoteLearner {
                store_id: l.store_id,
                peer_id: l.id,
            }
        } else {
            OpStep::RemovePeer {
                store_id: l.store_id,
                peer_id: l.id,
            }
        };
        return Some(Operator::new(
            &r.region,
            OpKind::Replica,
            "fix stray learner",
            vec![step],
        ));
    }
    // 2. A voter on a down/offline store: replace it.
    for p in &voters {
        if is_bad_peer(snap, r, p.store_id, p.id) {
            let offline = store(snap, p.store_id).is_some_and(|s| s.is_offline());
            let kind = if offline {
                OpKind::Removal
            } else {
                OpKind::Replica
            };
            // With too few healthy voters left, adding first is the only safe move.
            let target = pick_target(snap, r, max_snapshots, &[]);
            return match target {
                Some(t) => {
                    let new_peer = ids.next_id()?;
                    if p.store_id == leader.store_id {
                        // The leader itself is on a bad store (offline): hand off first.
                        let to = voters.iter().find(|v| {
                            v.store_id != p.store_id && !is_bad_peer(snap, r, v.store_id, v.id)
                        })?;
                        let mut steps = vec![OpStep::TransferLeader {
                            from_store: p.store_id,
                            to_store: to.store_id,
                        }];
                        steps.extend(
                            replace_steps(r, p.store_id, p.id, t, new_peer)
                                .into_iter()
                                .filter(|s| !matches!(s, OpStep::TransferLeader { .. })),
                        );
                        Some(Operator::new(
                            &r.region,
                            kind,
                            format!("replace peer on store {}", p.store_id),
                            steps,
                        ))
                    } else {
                        Some(Operator::new(
                            &r.region,
                            kind,
                            format!("replace peer on store {}", p.store_id),
                            replace_steps(r, p.store_id, p.id, t, new_peer),
                        ))
                    }
                }
                None if voters.len() > max_replicas => Some(Operator::new(
                    &r.region,
                    kind,
                    format!("remove peer on store {}", p.store_id),
                    vec![OpStep::RemovePeer {
                        store_id: p.store_id,
                        peer_id: p.id,
                    }],
                )),
                // Nowhere to go. A down peer that is not the leader can still be removed if a
                // quorum of healthy voters remains and we are over the target count.
                None => None,
            };
        }
    }
    // 3. Too few voters: add one.
    if voters.len() < max_replicas {
        let t = pick_target(snap, r, max_snapshots, &[])?;
        let id = ids.next_id()?;
        return Some(Operator::new(
            &r.region,
            OpKind::Replica,
            format!("add replica on store {t}"),
            vec![
                OpStep::AddLearner {
                    store_id: t,
                    peer_id: id,
                },
                OpStep::PromoteLearner {
                    store_id: t,
                    peer_id: id,
                },
            ],
        ));
    }
    // 4. Too many voters: remove one, never the leader, from the busiest store.
    if voters.len() > max_replicas {
        let victim = voters
            .iter()
            .filter(|p| p.store_id != leader.store_id)
            .max_by_key(|p| store(snap, p.store_id).map_or(usize::MAX, |s| s.region_count))?;
        return Some(Operator::new(
            &r.region,
            OpKind::Replica,
            format!("remove extra replica on store {}", victim.store_id),
            vec![OpStep::RemovePeer {
                store_id: victim.store_id,
                peer_id: victim.id,
            }],
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::mock::MockCluster;
    use super::*;

    #[test]
    fn adds_missing_replicas_on_the_emptiest_store() {
        let mut c = MockCluster::new(&[1, 2, 3, 4]);
        c.add_region(&[1, 2, 3], 1);
        c.add_region(&[1, 2, 3], 1);
        let r = c.add_region(&[1], 1);
        let mut ids = c.ids();
        let view = c.snap.regions.iter().find(|x| x.region.id == r).unwrap();
        let op = check_replicas(&c.snap, view, 3, 3, &mut ids).unwrap();
        assert_eq!(op.steps.len(), 2);
        assert!(matches!(
            op.steps[0],
            OpStep::AddLearner { store_id: 4, .. }
        ));
        assert!(matches!(
            op.steps[1],
            OpStep::PromoteLearner { store_id: 4, .. }
        ));
    }

    #[test]
    fn replaces_a_peer_on_a_down_store() {
        let mut c = MockCluster::new(&[1, 2, 3, 4]);
        let r = c.add_region(&[1, 2, 3], 1);
        c.snap.stores.get_mut(&3).unwrap().is_down = true;
        let mut ids = c.ids();
        let op = check_replicas(&c.snap, &c.snap.regions[0], 3, 3, &mut ids).unwrap();
        assert_eq!(op.region_id, r);
        assert!(matches!(
            op.steps[0],
            OpStep::AddLearner { store_id: 4, .. }
        ));
        assert!(matches!(
            op.steps.last().unwrap(),
            OpStep::RemovePeer { store_id: 3, .. }
        ));
        // No target: nothing to do (never drop below the replica count).
        c.snap.stores.get_mut(&4).unwrap().is_up = false;
        assert!(check_replicas(&c.snap, &c.snap.regions[0], 3, 3, &mut ids).is_none());
    }

    #[test]
    fn a_peer_reported_down_is_replaced_only_after_max_store_down_time() {
        let mut c = MockCluster::new(&[1, 2, 3, 4]);
        c.add_region(&[1, 2, 3], 1);
        let down = c.snap.regions[0].region.peers[2].id;
        // Reported down (a sleeping region's follower on a silent store, say), not for long.
        c.snap.regions[0].down_peers = vec![down];
        let mut ids = c.ids();
        assert!(!c.snap.regions[0].is_healthy());
        assert!(check_replicas(&c.snap, &c.snap.regions[0], 3, 3, &mut ids).is_none());
        c.snap.regions[0].long_down_peers = vec![down];
        let op = check_replicas(&c.snap, &c.snap.regions[0], 3, 3, &mut ids).unwrap();
        assert!(matches!(
            op.steps.last().unwrap(),
            OpStep::RemovePeer { store_id: 3, .. }
        ));
    }

    #[test]
    fn moves_leadership_off_an_offline_store_first() {
        let mut c = MockCluster::new(&[1, 2, 3, 4]);
        c.add_region(&[1, 2, 3], 1);
        c.snap.stores.get_mut(&1).unwrap().state = atoll_proto::metapb::StoreState::Offline as i32;
        let mut ids = c.ids();
        let op = check_replicas(&c.snap, &c.snap.regions[0], 3, 3, &mut ids).unwrap();
        assert_eq!(op.kind, OpKind::Removal);
        assert!(matches!(
            op.steps[0],
            OpStep::TransferLeader { from_store: 1, .. }
        ));
        assert!(matches!(
            op.steps.last().unwrap(),
            OpStep::RemovePeer { store_id: 1, .. }
        ));
        assert!(op
            .steps
            .iter()
            .any(|s| matches!(s, OpStep::AddLearner { store_id: 4, .. })));
    }

    #[test]
    fn removes_extra_replicas_but_never_the_leader() {
        let mut c = MockCluster::new(&[1, 2, 3, 4]);
        c.add_region(&[1, 2, 3, 4], 4);
        c.add_region(&[1, 2, 3], 1);
        let mut ids = c.ids();
        let op = check_replicas(&c.snap, &c.snap.regions[0], 3, 3, &mut ids).unwrap();
        match &op.steps[0] {
            OpStep::RemovePeer { store_id, .. } => assert_ne!(*store_id, 4),
            s => panic!("unexpected {s:?}"),
        }
    }

    #[test]
    fn respects_snapshot_limits_and_leaves_healthy_regions_alone() {
        let mut c = MockCluster::new(&[1, 2, 3, 4]);
        c.add_region(&[1, 2, 3], 1);
        let mut ids = c.ids();
        assert!(check_replicas(&c.snap, &c.snap.regions[0], 3, 3, &mut ids).is_none());
        c.add_region(&[1], 1);
        c.snap.stores.get_mut(&4).unwrap().pending_snapshots = 3;
        let op = check_replicas(&c.snap, &c.snap.regions[1], 3, 3, &mut ids).unwrap();
        assert!(!matches!(
            op.steps[0],
            OpStep::AddLearner { store_id: 4, .. }
        ));
    }
}
