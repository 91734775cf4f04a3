//! The coordinator: owns running operators, decides when checkers and schedulers run, applies
//! the limits (operators per kind, snapshots per store), and says which step each region's
//! leader should take next. It is driven by region heartbeats and by a periodic tick; it does
//! no I/O itself — callers send the steps it returns.

use super::balance::{balance_leaders, balance_regions};
use super::checker::check_replicas;
use super::operator::{OpKind, OpStatus, Operator};
use super::{ClusterSnapshot, IdSource, RegionView};
use crate::config::ScheduleConfig;
use atoll_proto::pdpb;
use std::collections::{HashMap, HashSet};

pub struct Coordinator {
    pub cfg: ScheduleConfig,
    pub operators: HashMap<u64, Operator>,
    /// Operators finished, by kind (for status and tests).
    pub finished: HashMap<OpKind, u64>,
    pub timed_out: u64,
}

impl Coordinator {
    pub fn new(cfg: ScheduleConfig) -> Self {
        Coordinator {
            cfg,
            operators: HashMap::new(),
            finished: HashMap::new(),
            timed_out: 0,
        }
    }

    fn count(&self, kind: OpKind) -> usize {
        self.operators.values().filter(|o| o.kind == kind).count()
    }

    fn limit(&self, kind: OpKind) -> usize {
        match kind {
            OpKind::Replica | OpKind::Removal => self.cfg.replica_schedule_limit,
            OpKind::BalanceRegion => self.cfg.region_schedule_limit,
            OpKind::BalanceLeader => self.cfg.leader_schedule_limit,
        }
    }

    /// Snapshots in flight per store from running operators.
    pub fn pending_snapshots(&self) -> HashMap<u64, usize> {
        let mut m = HashMap::new();
        for op in self.operators.values() {
            for s in op.pending_targets() {
                *m.entry(s).or_insert(0) += 1;
            }
        }
        m
    }

    fn admit(&mut self, op: Operator) -> bool {
        if self.operators.contains_key(&op.region_id) || self.count(op.kind) >= self.limit(op.kind)
        {
            return false;
        }
        let pending = self.pending_snapshots();
        for t in op.pending_targets() {
            if pending.get(&t).copied().unwrap_or(0) >= self.cfg.max_snapshot_count {
                return false;
            }
        }
        tracing::info!(region_id = op.region_id, kind = op.kind.name(), desc = %op.desc, "operator created");
        OPERATORS_CREATED.with_label_values(&[op.kind.name()]).inc();
        self.operators.insert(op.region_id, op);
        true
    }

    /// A region reported itself: advance its operator, or check its replicas. Returns the
    /// step to send to the leader, if any.
    /// `snap` needs only the stores (with their counts): `view` is the region.
    pub fn on_region(
        &mut self,
        snap: &ClusterSnapshot,
        view: &RegionView,
        ids: &mut dyn IdSource,
    ) -> Option<pdpb::RegionHeartbeatResponse> {
        let region = &view.region;
        if let Some(op) = self.operators.get_mut(&region.id) {
            match op.check(region, view.leader.as_ref()) {
                OpStatus::Running(step) => {
                    if op.is_timed_out(self.cfg.operator_timeout.0) {
                        tracing::warn!(region_id = region.id, desc = %op.desc, "operator timed out");
                        self.operators.remove(&region.id);
                        self.timed_out += 1;
                        return None;
                    }
                    return Some(step.to_response(region));
                }
                OpStatus::Finished => {
                    let op = self.operators.remove(&region.id).expect("present");
                    tracing::info!(
                        region_id = region.id,
                        kind = op.kind.name(),
                        "operator finished"
                    );
                    *self.finished.entry(op.kind).or_insert(0) += 1;
                }
                OpStatus::Stale => {
                    self.operators.remove(&region.id);
                }
            }
        }
        let mut adjusted = snap.clone();
        for (s, n) in self.pending_snapshots() {
            if let Some(st) = adjusted.stores.get_mut(&s) {
                st.pending_snapshots = n;
            }
        }
        let op = check_replicas(
            &adjusted,
            view,
            self.cfg.max_replicas,
            self.cfg.max_snapshot_count,
            ids,
        )?;
        let first = op.steps.first()?.to_response(region);
        if self.admit(op) {
            Some(first)
        } else {
            None
        }
    }

    /// Periodic: drop timed-out operators, check every region's replicas, balance. Returns
    /// the first step of each new operator (to push to leaders now).
    pub fn tick(
        &mut self,
        snap: &ClusterSnapshot,
        ids: &mut dyn IdSource,
    ) -> Vec<pdpb::RegionHeartbeatResponse> {
        let timeout = self.cfg.operator_timeout.0;
        let before = self.operators.len();
        self.operators.retain(|_, o| !o.is_timed_out(timeout));
        self.timed_out += (before - self.operators.len()) as u64;
        let mut adjusted = snap.clone();
        for (s, n) in self.pending_snapshots() {
            if let Some(st) = adjusted.stores.get_mut(&s) {
                st.pending_snapshots = n;
            }
        }
        let mut out = vec![];
        // Replica repair first (patrol): covers hibernating regions whose heartbeats are rare.
        for r in &snap.regions {
            if self.operators.contains_key(&r.region.id) {
                continue;
            }
            if self.count(OpKind::Replica) + self.count(OpKind::Removal)
                >= self.cfg.replica_schedule_limit
            {
                break;
            }
            if let Some(op) = check_replicas(
                &adjusted,
                r,
                self.cfg.max_replicas,
                self.cfg.max_snapshot_count,
                ids,
            ) {
                let first = op.steps[0].to_response(&r.region);
                for t in op.pending_targets() {
                    if let Some(st) = adjusted.stores.get_mut(&t) {
                        st.pending_snapshots += 1;
                    }
                }
                if self.admit(op) {
                    out.push(first);
                }
            }
        }
        if !self.cfg.enable_balance {
            return out;
        }
        let busy: HashSet<u64> = self.operators.keys().copied().collect();
        let room = self
            .limit(OpKind::BalanceRegion)
            .saturating_sub(self.count(OpKind::BalanceRegion));
        for op in balance_regions(
            &adjusted,
            &busy,
            room,
            self.cfg.tolerance_ratio,
            self.cfg.max_snapshot_count,
            ids,
        ) {
            let region = snap
                .regions
                .iter()
                .find(|r| r.region.id == op.region_id)
                .map(|r| r.region.clone());
            let first = region.map(|r| op.steps[0].to_response(&r));
            if self.admit(op) {
                out.extend(first);
            }
        }
        let busy: HashSet<u64> = self.operators.keys().copied().collect();
        let room = self
            .limit(OpKind::BalanceLeader)
            .saturating_sub(self.count(OpKind::BalanceLeader));
        for op in balance_leaders(&adjusted, &busy, room, self.cfg.tolerance_ratio) {
            let region = snap
                .regions
                .iter()
                .find(|r| r.region.id == op.region_id)
                .map(|r| r.region.clone());
            let first = region.map(|r| op.steps[0].to_response(&r));
            if self.admit(op) {
                out.extend(first);
            }
        }
        out
    }

    /// The leader store of every region with a running operator and its current step
    /// (re-sent periodically in case a step was lost).
    /// `region` looks a region up by id (the operators are few; the regions may be many).
    pub fn running_steps(
        &mut self,
        region: &dyn Fn(u64) -> Option<RegionView>,
    ) -> Vec<pdpb::RegionHeartbeatResponse> {
        let mut out = vec![];
        for (id, op) in self.operators.iter_mut() {
            let Some(r) = region(*id) else { continue };
            if let OpStatus::Running(step) = op.check(&r.region, r.leader.as_ref()) {
                out.push(step.to_response(&r.region));
            }
        }
        out
    }

    pub fn infos(&self) -> Vec<pdpb::OperatorInfo> {
        let mut v: Vec<_> = self.operators.values().map(|o| o.info()).collect();
        v.sort_by_key(|o| o.region_id);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::super::mock::MockCluster;
    use super::*;

    #[test]
    fn repairs_then_balances_within_limits() {
        let mut c = MockCluster::new(&[1, 2, 3, 4]);
        for i in 0..12 {
            c.add_region(&[1, 2, 3], [1, 2, 3][i % 3]);
        }
        c.add_region(&[1], 1);
        let cfg = ScheduleConfig {
            region_schedule_limit: 2,
            ..Default::default()
        };
        let mut co = Coordinator::new(cfg);
        let mut ids: Vec<u64> = (1..1000).collect();
        let steps = co.tick(&c.snap, &mut ids);
        let kinds: Vec<OpKind> = co.operators.values().map(|o| o.kind).collect();
        assert!(kinds.contains(&OpKind::Replica));
        assert_eq!(
            kinds
                .iter()
                .filter(|k| **k == OpKind::BalanceRegion)
                .count(),
            2
        );
        assert_eq!(steps.len(), co.operators.len());
        // A second tick adds nothing beyond the limits.
        let again = co.tick(&c.snap, &mut ids);
        assert!(again.iter().all(|s| s.transfer_leader.is_some()) || again.is_empty());
    }
}

atoll_util::metric!(
    /// Operators admitted, by kind (replica, balance-leader, ...).
    static OPERATORS_CREATED: atoll_util::metrics::IntCounterVec = int_counter_vec(
        "atoll_pd_operators_created_total",
        "Operators admitted by the coordinator, by kind",
        &["kind"]
    )
);
