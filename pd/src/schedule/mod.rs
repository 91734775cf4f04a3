//! Scheduling as pure functions over a snapshot of the cluster, returning operators made of
//! steps. The [`coordinator::Coordinator`] owns the running operators, enforces limits and
//! talks to stores; everything in [`checker`] and [`balance`] only reads a
//! [`ClusterSnapshot`] and is unit-tested against hand-built clusters.

pub mod balance;
pub mod checker;
pub mod coordinator;
pub mod operator;

use atoll_proto::metapb;
use std::collections::HashMap;

#[derive(Clone, Debug, Default)]
pub struct StoreView {
    pub id: u64,
    pub state: i32,
    /// Heartbeats arrive (not disconnected).
    pub is_up: bool,
    /// Silent longer than max-store-down-time.
    pub is_down: bool,
    pub region_count: usize,
    pub leader_count: usize,
    pub region_size: u64,
    /// Peers being added to this store by running operators (snapshots in flight).
    pub pending_snapshots: usize,
}

impl StoreView {
    pub fn is_offline(&self) -> bool {
        self.state == metapb::StoreState::Offline as i32
    }
    pub fn is_tombstone(&self) -> bool {
        self.state == metapb::StoreState::Tombstone as i32
    }
    /// May receive new peers and leaders.
    pub fn is_schedulable(&self) -> bool {
        self.is_up && !self.is_down && self.state == metapb::StoreState::Up as i32
    }
}

#[derive(Clone, Debug, Default)]
pub struct RegionView {
    pub region: metapb::Region,
    pub leader: Option<metapb::Peer>,
    pub approximate_size: u64,
    /// Peers the leader reports down (the region counts as unhealthy).
    pub down_peers: Vec<u64>,
    /// Those of them down for at least max-store-down-time (to be replaced).
    pub long_down_peers: Vec<u64>,
    pub pending_peers: Vec<u64>,
}

impl RegionView {
    pub fn peer_on(&self, store_id: u64) -> Option<&metapb::Peer> {
        self.region.peers.iter().find(|p| p.store_id == store_id)
    }
    pub fn leader_store(&self) -> Option<u64> {
        self.leader.as_ref().map(|l| l.store_id)
    }
    pub fn voters(&self) -> impl Iterator<Item = &metapb::Peer> {
        self.region
            .peers
            .iter()
            .filter(|p| p.role != metapb::PeerRole::Learner as i32)
    }
    pub fn learners(&self) -> impl Iterator<Item = &metapb::Peer> {
        self.region
            .peers
            .iter()
            .filter(|p| p.role == metapb::PeerRole::Learner as i32)
    }
    /// Every peer healthy: no down or pending (lagging) peer, and a leader.
    pub fn is_healthy(&self) -> bool {
        self.leader.is_some() && self.down_peers.is_empty() && self.pending_peers.is_empty()
    }
}

#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub stores: HashMap<u64, StoreView>,
    pub regions: Vec<RegionView>,
}

impl ClusterSnapshot {
    /// Builds store counts from the regions (callers fill states and health).
    pub fn count_regions(&mut self) {
        for s in self.stores.values_mut() {
            s.region_count = 0;
            s.leader_count = 0;
            s.region_size = 0;
        }
        for r in &self.regions {
            for p in &r.region.peers {
                if let Some(s) = self.stores.get_mut(&p.store_id) {
                    s.region_count += 1;
                    s.region_size += r.approximate_size.max(1);
                }
            }
            if let Some(l) = r.leader_store() {
                if let Some(s) = self.stores.get_mut(&l) {
                    s.leader_count += 1;
                }
            }
        }
    }

    pub fn schedulable_stores(&self) -> Vec<&StoreView> {
        let mut v: Vec<&StoreView> = self
            .stores
            .values()
            .filter(|s| s.is_schedulable())
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }
}

/// Hands out fresh peer ids (pre-allocated from PD's id allocator).
pub trait IdSource {
    fn next_id(&mut self) -> Option<u64>;
}

impl IdSource for Vec<u64> {
    fn next_id(&mut self) -> Option<u64> {
        self.pop()
    }
}

#[cfg(test)]
pub(crate) mod mock {
    //! A mock cluster for scheduler tests.
    use super::*;

    pub struct MockCluster {
        pub snap: ClusterSnapshot,
        next_region: u64,
        next_peer: u64,
    }

    impl MockCluster {
        pub fn new(stores: &[u64]) -> Self {
            let mut snap = ClusterSnapshot::default();
            for id in stores {
                snap.stores.insert(
                    *id,
                    StoreView {
                        id: *id,
                        state: 0,
                        is_up: true,
                        ..Default::default()
                    },
                );
            }
            MockCluster {
                snap,
                next_region: 1,
                next_peer: 1000,
            }
        }

        /// A region with voters on `stores` and its leader on `leader`.
        pub fn add_region(&mut self, stores: &[u64], leader: u64) -> u64 {
            let id = self.next_region;
            self.next_region += 1;
            let peers: Vec<metapb::Peer> = stores
                .iter()
                .map(|s| {
                    self.next_peer += 1;
                    metapb::Peer {
                        id: self.next_peer,
                        store_id: *s,
                        role: 0,
                    }
                })
                .collect();
            let leader = peers.iter().find(|p| p.store_id == leader).cloned();
            let region = metapb::Region {
                id,
                start_key: format!("r{id:06}").into_bytes(),
                end_key: format!("r{:06}", id + 1).into_bytes(),
                region_epoch: Some(metapb::RegionEpoch {
                    conf_ver: 1,
                    version: 1,
                }),
                peers,
            };
            self.snap.regions.push(RegionView {
                region,
                leader,
                approximate_size: 1,
                ..Default::default()
            });
            self.snap.count_regions();
            id
        }

        pub fn ids(&self) -> Vec<u64> {
            (50_000..50_100).rev().collect()
        }
    }
}
