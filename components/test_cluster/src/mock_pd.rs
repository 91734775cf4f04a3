//! An in-memory placement driver for in-process clusters: ids, stores, the region tree fed by
//! heartbeats and split reports, a TSO, and a GC safe point. It schedules nothing by itself;
//! tests can queue operator steps for a region with [`MockPd::push_operator`].

use async_trait::async_trait;
use atoll_pd_client::{compose_ts, Error, HeartbeatResponseHandler, PdClient, RegionInfo, Result};
use atoll_proto::{metapb, pdpb};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Default)]
struct State {
    stores: HashMap<u64, metapb::Store>,
    store_stats: HashMap<u64, pdpb::StoreStats>,
    regions: HashMap<u64, metapb::Region>,
    leaders: HashMap<u64, metapb::Peer>,
    /// start key -> region id
    tree: BTreeMap<Vec<u8>, u64>,
    operators: HashMap<u64, VecDeque<pdpb::RegionHeartbeatResponse>>,
    gc_safe_point: u64,
}

pub struct MockPd {
    next_id: AtomicU64,
    bootstrapped: AtomicBool,
    state: RwLock<State>,
    handler: RwLock<Option<Arc<HeartbeatResponseHandler>>>,
    tso: Mutex<(i64, i64)>,
    pub heartbeats: AtomicU64,
}

impl Default for MockPd {
    fn default() -> Self {
        Self::new()
    }
}

fn epoch(r: &metapb::Region) -> metapb::RegionEpoch {
    r.region_epoch.unwrap_or_default()
}

impl MockPd {
    pub fn new() -> Self {
        MockPd {
            next_id: AtomicU64::new(1000),
            bootstrapped: AtomicBool::new(false),
            state: RwLock::new(State::default()),
            handler: RwLock::new(None),
            tso: Mutex::new((0, 0)),
            heartbeats: AtomicU64::new(0),
        }
    }

    pub fn alloc(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::SeqCst)
    }

    /// Records a region if it is not older than what is known; drops what it replaces.
    pub fn put_region(&self, region: metapb::Region) {
        let mut s = self.state.write();
        if let Some(old) = s.regions.get(&region.id) {
            let (o, n) = (epoch(old), epoch(&region));
            if n.version < o.version || n.conf_ver < o.conf_ver {
                return;
            }
            let old_start = old.start_key.clone();
            if s.tree.get(&old_start) == Some(&region.id) {
                s.tree.remove(&old_start);
            }
        }
        // Remove regions this one now overlaps (they are stale).
        let overlapped: Vec<u64> = s
            .regions
            .values()
            .filter(|r| {
                r.id != region.id
                    && atoll_keys::ranges_overlap(
                        &r.start_key,
                        &r.end_key,
                        &region.start_key,
                        &region.end_key,
                    )
            })
            .filter(|r| epoch(r).version <= epoch(&region).version)
            .map(|r| r.id)
            .collect();
        for id in overlapped {
            if let Some(r) = s.regions.remove(&id) {
                if s.tree.get(&r.start_key) == Some(&id) {
                    s.tree.remove(&r.start_key);
                }
                s.leaders.remove(&id);
            }
        }
        s.tree.insert(region.start_key.clone(), region.id);
        s.regions.insert(region.id, region);
    }

    pub fn region_by_key(&self, key: &[u8]) -> Option<metapb::Region> {
        let s = self.state.read();
        let (_, id) = s.tree.range(..=key.to_vec()).next_back()?;
        let r = s.regions.get(id)?;
        atoll_keys::in_range(key, &r.start_key, &r.end_key).then(|| r.clone())
    }

    pub fn region_count(&self) -> usize {
        self.state.read().regions.len()
    }

    pub fn leader_of(&self, region_id: u64) -> Option<metapb::Peer> {
        self.state.read().leaders.get(&region_id).cloned()
    }

    /// Queues an operator step to hand to the region's leader at its next heartbeat.
    pub fn push_operator(&self, region_id: u64, resp: pdpb::RegionHeartbeatResponse) {
        self.state
            .write()
            .operators
            .entry(region_id)
            .or_default()
            .push_back(resp);
    }

    pub fn store_stats(&self, store_id: u64) -> Option<pdpb::StoreStats> {
        self.state.read().store_stats.get(&store_id).cloned()
    }
}

#[async_trait]
impl PdClient for MockPd {
    fn cluster_id(&self) -> u64 {
        1
    }

    async fn is_cluster_bootstrapped(&self) -> Result<bool> {
        Ok(self.bootstrapped.load(Ordering::SeqCst))
    }

    async fn bootstrap_cluster(&self, store: metapb::Store, region: metapb::Region) -> Result<()> {
        if self.bootstrapped.swap(true, Ordering::SeqCst) {
            return Err(Error::AlreadyBootstrapped);
        }
        self.state.write().stores.insert(store.id, store);
        self.put_region(region);
        Ok(())
    }

    async fn alloc_ids(&self, count: u32) -> Result<u64> {
        Ok(self
            .next_id
            .fetch_add(count.max(1) as u64, Ordering::SeqCst))
    }

    async fn put_store(&self, store: metapb::Store) -> Result<()> {
        self.state.write().stores.insert(store.id, store);
        Ok(())
    }

    async fn get_store(&self, store_id: u64) -> Result<metapb::Store> {
        self.state
            .read()
            .stores
            .get(&store_id)
            .cloned()
            .ok_or(Error::StoreNotFound(store_id))
    }

    async fn get_all_stores(&self, _exclude_tombstone: bool) -> Result<Vec<pdpb::StoreInfo>> {
        let s = self.state.read();
        Ok(s.stores
            .values()
            .map(|st| pdpb::StoreInfo {
                store: Some(st.clone()),
                stats: s.store_stats.get(&st.id).cloned(),
                ..Default::default()
            })
            .collect())
    }

    async fn store_heartbeat(
        &self,
        stats: pdpb::StoreStats,
    ) -> Result<pdpb::StoreHeartbeatResponse> {
        let mut s = self.state.write();
        let gc = s.gc_safe_point;
        s.store_stats.insert(stats.store_id, stats);
        Ok(pdpb::StoreHeartbeatResponse {
            gc_safe_point: gc,
            ..Default::default()
        })
    }

    async fn delete_store(&self, store_id: u64) -> Result<()> {
        let mut s = self.state.write();
        let st = s
            .stores
            .get_mut(&store_id)
            .ok_or(Error::StoreNotFound(store_id))?;
        st.state = metapb::StoreState::Offline as i32;
        Ok(())
    }

    async fn region_heartbeat(&self, req: pdpb::RegionHeartbeatRequest) -> Result<()> {
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
        let Some(region) = req.region else {
            return Ok(());
        };
        let id = region.id;
        self.put_region(region);
        let op = {
            let mut s = self.state.write();
            if let Some(l) = req.leader {
                s.leaders.insert(id, l);
            }
            s.operators.get_mut(&id).and_then(|q| q.pop_front())
        };
        if let Some(mut op) = op {
            op.region_id = id;
            if let Some(h) = self.handler.read().clone() {
                h(op);
            }
        }
        Ok(())
    }

    fn set_heartbeat_handler(&self, handler: HeartbeatResponseHandler) {
        *self.handler.write() = Some(Arc::new(handler));
    }

    async fn get_region(&self, key: &[u8]) -> Result<RegionInfo> {
        let r = self.region_by_key(key).ok_or(Error::RegionNotFound)?;
        let leader = self.leader_of(r.id);
        Ok(RegionInfo { region: r, leader })
    }

    async fn get_prev_region(&self, key: &[u8]) -> Result<RegionInfo> {
        let s = self.state.read();
        let r = s
            .regions
            .values()
            .find(|r| {
                if key.is_empty() {
                    r.end_key.is_empty()
                } else {
                    r.end_key == key
                }
            })
            .cloned()
            .ok_or(Error::RegionNotFound)?;
        let leader = s.leaders.get(&r.id).cloned();
        Ok(RegionInfo { region: r, leader })
    }

    async fn get_region_by_id(&self, region_id: u64) -> Result<Option<RegionInfo>> {
        let s = self.state.read();
        Ok(s.regions.get(&region_id).map(|r| RegionInfo {
            region: r.clone(),
            leader: s.leaders.get(&region_id).cloned(),
        }))
    }

    async fn scan_regions(&self, start: &[u8], end: &[u8], limit: u32) -> Result<Vec<RegionInfo>> {
        let s = self.state.read();
        let mut out = vec![];
        let first = s
            .tree
            .range(..=start.to_vec())
            .next_back()
            .map(|(k, _)| k.clone())
            .unwrap_or_default();
        for (_, id) in s.tree.range(first..) {
            let r = &s.regions[id];
            if !end.is_empty() && r.start_key.as_slice() >= end {
                break;
            }
            if !r.end_key.is_empty() && r.end_key.as_slice() <= start {
                continue;
            }
            out.push(RegionInfo {
                region: r.clone(),
                leader: s.leaders.get(id).cloned(),
            });
            if limit > 0 && out.len() >= limit as usize {
                break;
            }
        }
        Ok(out)
    }

    async fn ask_batch_split(
        &self,
        region: metapb::Region,
        count: u32,
    ) -> Result<Vec<pdpb::SplitId>> {
        Ok((0..count)
            .map(|_| pdpb::SplitId {
                new_region_id: self.alloc(),
                new_peer_ids: region.peers.iter().map(|_| self.alloc()).collect(),
            })
            .collect())
    }

    async fn report_batch_split(&self, regions: Vec<metapb::Region>) -> Result<()> {
        for r in regions {
            self.put_region(r);
        }
        Ok(())
    }

    async fn get_tso_block(&self, count: u32) -> Result<u64> {
        let count = count.max(1) as i64;
        let mut t = self.tso.lock();
        let now = atoll_util::unix_millis() as i64;
        if now > t.0 {
            *t = (now, 0);
        }
        if t.1 + count >= 1 << 18 {
            *t = (t.0 + 1, 0);
        }
        let first = compose_ts(t.0, t.1);
        t.1 += count;
        Ok(first)
    }

    async fn get_gc_safe_point(&self) -> Result<u64> {
        Ok(self.state.read().gc_safe_point)
    }

    async fn update_gc_safe_point(&self, safe_point: u64) -> Result<u64> {
        let mut s = self.state.write();
        s.gc_safe_point = s.gc_safe_point.max(safe_point);
        Ok(s.gc_safe_point)
    }

    async fn get_members(&self) -> Result<pdpb::GetMembersResponse> {
        Ok(pdpb::GetMembersResponse::default())
    }

    async fn get_operators(&self) -> Result<Vec<pdpb::OperatorInfo>> {
        Ok(vec![])
    }
}
