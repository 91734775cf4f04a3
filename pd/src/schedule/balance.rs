//! Balancing: leaders (by count) and region peers (by count, then size) across schedulable
//! stores. Each call proposes at most `limit` operators for regions not already being moved,
//! each moving one unit from the most loaded store toward the least loaded one, and only
//! while the gap is worth it (more than one unit and more than `tolerance` of the mean).

use super::checker::{pick_target, replace_steps};
use super::operator::{OpKind, OpStep, Operator};
use super::{ClusterSnapshot, IdSource, RegionView};
use std::collections::{HashMap, HashSet};

fn worth_moving(from: usize, to: usize, mean: f64, tolerance: f64) -> bool {
    from > to + 1 && (from as f64 - to as f64) > (mean * tolerance).max(1.0)
}

pub fn balance_leaders(
    snap: &ClusterSnapshot,
    busy: &HashSet<u64>,
    limit: usize,
    tolerance: f64,
) -> Vec<Operator> {
    let mut out = vec![];
    let stores = snap.schedulable_stores();
    if stores.len() < 2 || limit == 0 {
        return out;
    }
    let mut counts: HashMap<u64, usize> = stores.iter().map(|s| (s.id, s.leader_count)).collect();
    let mean = counts.values().sum::<usize>() as f64 / counts.len() as f64;
    let mut used: HashSet<u64> = busy.clone();
    while out.len() < limit {
        let (&src, &src_n) = counts
            .iter()
            .max_by_key(|(id, n)| (**n, std::cmp::Reverse(**id)))
            .expect("non-empty");
        // Candidate regions led by src with a healthy follower on a lighter store.
        let mut best: Option<(&RegionView, u64)> = None;
        for r in &snap.regions {
            if used.contains(&r.region.id) || r.leader_store() != Some(src) || !r.is_healthy() {
                continue;
            }
            for p in r.voters() {
                if p.store_id == src {
                    continue;
                }
                let Some(&n) = counts.get(&p.store_id) else {
                    continue;
                };
                if worth_moving(src_n, n, mean, tolerance)
                    && best.as_ref().is_none_or(|(_, b)| n < counts[b])
                {
                    best = Some((r, p.store_id));
                }
            }
        }
        let Some((r, dst)) = best else { break };
        used.insert(r.region.id);
        *counts.get_mut(&src).expect("src counted") -= 1;
        *counts.get_mut(&dst).expect("dst counted") += 1;
        out.push(Operator::new(
            &r.region,
            OpKind::BalanceLeader,
            format!("balance leader {src}->{dst}"),
            vec![OpStep::TransferLeader {
                from_store: src,
                to_store: dst,
            }],
        ));
    }
    out
}

pub fn balance_regions(
    snap: &ClusterSnapshot,
    busy: &HashSet<u64>,
    limit: usize,
    tolerance: f64,
    max_snapshots: usize,
    ids: &mut dyn IdSource,
) -> Vec<Operator> {
    let mut out = vec![];
    let stores = snap.schedulable_stores();
    if stores.len() < 2 || limit == 0 {
        return out;
    }
    let mut counts: HashMap<u64, usize> = stores.iter().map(|s| (s.id, s.region_count)).collect();
    let mut pending: HashMap<u64, usize> =
        stores.iter().map(|s| (s.id, s.pending_snapshots)).collect();
    let mean = counts.values().sum::<usize>() as f64 / counts.len() as f64;
    let mut used: HashSet<u64> = busy.clone();
    while out.len() < limit {
        let (&src, &src_n) = counts
            .iter()
            .max_by_key(|(id, n)| (**n, std::cmp::Reverse(**id)))
            .expect("non-empty");
        let mut adjusted = snap.clone();
        for (id, n) in &counts {
            if let Some(s) = adjusted.stores.get_mut(id) {
                s.region_count = *n;
                s.pending_snapshots = pending[id];
            }
        }
        let mut chosen = None;
        // Prefer regions not led by the source (no leader hand-off needed), larger ones last.
        let mut candidates: Vec<&RegionView> = snap
            .regions
            .iter()
            .filter(|r| {
                !used.contains(&r.region.id)
                    && r.peer_on(src).is_some()
                    && r.is_healthy()
                    && r.learners().next().is_none()
            })
            .collect();
        candidates.sort_by_key(|r| {
            (
                r.leader_store() == Some(src),
                r.approximate_size,
                r.region.id,
            )
        });
        for r in candidates {
            let Some(dst) = pick_target(&adjusted, r, max_snapshots, &[]) else {
                continue;
            };
            if !worth_moving(src_n, counts[&dst], mean, tolerance) {
                continue;
            }
            // The leader must have somewhere to go if it is the one moving.
            if r.leader_store() == Some(src) && r.voters().count() < 2 {
                continue;
            }
            chosen = Some((r, dst));
            break;
        }
        let Some((r, dst)) = chosen else { break };
        let Some(new_peer) = ids.next_id() else { break };
        let old = *r.peer_on(src).expect("candidate has a peer on src");
        let mut steps = replace_steps(r, src, old.id, dst, new_peer);
        // Hand leadership to an existing follower rather than to the newcomer.
        if let Some(pos) = steps
            .iter()
            .position(|s| matches!(s, OpStep::TransferLeader { .. }))
        {
            if let Some(f) = r.voters().find(|p| p.store_id != src) {
                steps[pos] = OpStep::TransferLeader {
                    from_store: src,
                    to_store: f.store_id,
                };
            }
        }
        used.insert(r.region.id);
        *counts.get_mut(&src).expect("src counted") -= 1;
        *counts.get_mut(&dst).expect("dst counted") += 1;
        *pending.get_mut(&dst).expect("dst counted") += 1;
        out.push(Operator::new(
            &r.region,
            OpKind::BalanceRegion,
            format!("balance region {src}->{dst}"),
            steps,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::mock::MockCluster;
    use super::*;

    #[test]
    fn leaders_spread_out() {
        let mut c = MockCluster::new(&[1, 2, 3]);
        for _ in 0..9 {
            c.add_region(&[1, 2, 3], 1);
        }
        let ops = balance_leaders(&c.snap, &HashSet::new(), 10, 0.1);
        let to2 = ops
            .iter()
            .filter(|o| {
                o.steps[0]
                    == OpStep::TransferLeader {
                        from_store: 1,
                        to_store: 2,
                    }
            })
            .count();
        let to3 = ops
            .iter()
            .filter(|o| {
                o.steps[0]
                    == OpStep::TransferLeader {
                        from_store: 1,
                        to_store: 3,
                    }
            })
            .count();
        assert_eq!(to2 + to3, ops.len());
        assert!((5..=6).contains(&ops.len()), "{} moves", ops.len());
        assert!(to2.abs_diff(to3) <= 1);
        // Balanced: nothing to do.
        let mut c = MockCluster::new(&[1, 2, 3]);
        for s in [1, 2, 3, 1, 2, 3] {
            c.add_region(&[1, 2, 3], s);
        }
        assert!(balance_leaders(&c.snap, &HashSet::new(), 10, 0.1).is_empty());
    }

    #[test]
    fn limits_and_busy_regions_are_respected() {
        let mut c = MockCluster::new(&[1, 2, 3]);
        for _ in 0..9 {
            c.add_region(&[1, 2, 3], 1);
        }
        assert_eq!(balance_leaders(&c.snap, &HashSet::new(), 2, 0.1).len(), 2);
        let busy: HashSet<u64> = (1..=9).collect();
        assert!(balance_leaders(&c.snap, &busy, 10, 0.1).is_empty());
    }

    #[test]
    fn regions_move_to_a_new_store() {
        let mut c = MockCluster::new(&[1, 2, 3, 4]);
        for i in 0..30 {
            c.add_region(&[1, 2, 3], [1, 2, 3][i % 3]);
        }
        let mut ids: Vec<u64> = (100_000..100_100).collect();
        let ops = balance_regions(&c.snap, &HashSet::new(), 100, 0.1, 100, &mut ids);
        // 90 peers over 4 stores: 22-23 each; store 4 should receive about 22.
        assert!((20..=23).contains(&ops.len()), "{} moves", ops.len());
        for op in &ops {
            assert!(op
                .steps
                .iter()
                .any(|s| matches!(s, OpStep::AddLearner { store_id: 4, .. })));
            assert!(matches!(
                op.steps.last().unwrap(),
                OpStep::RemovePeer { .. }
            ));
        }
        let mut from: HashMap<u64, usize> = HashMap::new();
        for op in &ops {
            if let OpStep::RemovePeer { store_id, .. } = op.steps.last().unwrap() {
                *from.entry(*store_id).or_default() += 1;
            }
        }
        assert!(
            from.values().max().unwrap() - from.values().min().unwrap() <= 1,
            "{from:?}"
        );
        // Snapshot limit caps the moves per round.
        let mut ids: Vec<u64> = (100_000..100_100).collect();
        assert_eq!(
            balance_regions(&c.snap, &HashSet::new(), 100, 0.1, 3, &mut ids).len(),
            3
        );
    }

    #[test]
    fn unhealthy_regions_stay_put() {
        let mut c = MockCluster::new(&[1, 2, 3, 4]);
        for _ in 0..6 {
            c.add_region(&[1, 2, 3], 1);
        }
        for r in &mut c.snap.regions {
            r.pending_peers = vec![r.region.peers[1].id];
        }
        let mut ids: Vec<u64> = (100_000..100_100).collect();
        assert!(balance_regions(&c.snap, &HashSet::new(), 10, 0.1, 10, &mut ids).is_empty());
        assert!(balance_leaders(&c.snap, &HashSet::new(), 10, 0.1).is_empty());
    }
}
