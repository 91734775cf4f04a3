//! The region cache: regions ordered by start key, filled from PD in batches and repaired from
//! the typed region errors stores send back; store addresses by id.

use crate::{Error, Result};
use atoll_pd_client::{PdClient, RegionInfo};
use atoll_proto::{errorpb, metapb};
use parking_lot::RwLock;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct CachedRegion {
    pub region: metapb::Region,
    pub leader: Option<metapb::Peer>,
}

impl CachedRegion {
    pub fn contains(&self, key: &[u8]) -> bool {
        atoll_keys::in_range(key, &self.region.start_key, &self.region.end_key)
    }
    /// The peer to send to: the known leader, else a voter.
    pub fn target(&self) -> Option<metapb::Peer> {
        self.leader
            .or_else(|| self.region.peers.iter().find(|p| p.role == 0).cloned())
    }
}

const PREFETCH: u32 = 64;

pub struct RegionCache {
    pd: Arc<dyn PdClient>,
    regions: RwLock<BTreeMap<Vec<u8>, CachedRegion>>,
    stores: RwLock<HashMap<u64, String>>,
}

impl RegionCache {
    pub fn new(pd: Arc<dyn PdClient>) -> Self {
        RegionCache {
            pd,
            regions: RwLock::new(BTreeMap::new()),
            stores: RwLock::new(HashMap::new()),
        }
    }

    pub fn pd(&self) -> &Arc<dyn PdClient> {
        &self.pd
    }

    fn lookup(&self, key: &[u8]) -> Option<CachedRegion> {
        let m = self.regions.read();
        let (_, r) = m.range(..=key.to_vec()).next_back()?;
        r.contains(key).then(|| r.clone())
    }

    /// Inserts a region, evicting cached ones it overlaps.
    pub fn insert(&self, info: CachedRegion) {
        let mut m = self.regions.write();
        let (s, e) = (info.region.start_key.clone(), info.region.end_key.clone());
        let from = m
            .range(..=s.clone())
            .next_back()
            .map(|(k, _)| k.clone())
            .unwrap_or_default();
        let doomed: Vec<Vec<u8>> = m
            .range(from..)
            .take_while(|(k, _)| e.is_empty() || k.as_slice() < e.as_slice())
            .filter(|(_, r)| {
                atoll_keys::ranges_overlap(&r.region.start_key, &r.region.end_key, &s, &e)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            m.remove(&k);
        }
        m.insert(s, info);
    }

    fn insert_infos(&self, infos: Vec<RegionInfo>) {
        for i in infos {
            self.insert(CachedRegion {
                region: i.region,
                leader: i.leader,
            });
        }
    }

    /// The region holding `key` (asks PD on a miss, fetching the next few regions too).
    pub async fn locate(&self, key: &[u8]) -> Result<CachedRegion> {
        if let Some(r) = self.lookup(key) {
            return Ok(r);
        }
        let infos = self.pd.scan_regions(key, &[], PREFETCH).await?;
        self.insert_infos(infos);
        if let Some(r) = self.lookup(key) {
            return Ok(r);
        }
        let i = self.pd.get_region(key).await?;
        let r = CachedRegion {
            region: i.region,
            leader: i.leader,
        };
        self.insert(r.clone());
        if r.contains(key) {
            Ok(r)
        } else {
            Err(Error::Region(format!(
                "PD has no region for key {key:?} yet"
            )))
        }
    }

    /// The region ending at `end` (the last region when `end` is empty): for reverse scans.
    pub async fn locate_before(&self, end: &[u8]) -> Result<CachedRegion> {
        {
            let m = self.regions.read();
            let found = if end.is_empty() {
                m.values()
                    .next_back()
                    .filter(|r| r.region.end_key.is_empty())
                    .cloned()
            } else {
                m.range(..end.to_vec())
                    .next_back()
                    .map(|(_, r)| r.clone())
                    .filter(|r| r.region.end_key.as_slice() >= end || r.region.end_key.is_empty())
                    .filter(|r| r.contains_before(end))
            };
            if let Some(r) = found {
                return Ok(r);
            }
        }
        let i = self.pd.get_prev_region(end).await?;
        let r = CachedRegion {
            region: i.region,
            leader: i.leader,
        };
        self.insert(r.clone());
        Ok(r)
    }

    pub fn invalidate(&self, region_id: u64) {
        let mut m = self.regions.write();
        let k = m
            .iter()
            .find(|(_, r)| r.region.id == region_id)
            .map(|(k, _)| k.clone());
        if let Some(k) = k {
            m.remove(&k);
        }
    }

    pub fn update_leader(&self, region_id: u64, leader: metapb::Peer) {
        let mut m = self.regions.write();
        if let Some(r) = m.values_mut().find(|r| r.region.id == region_id) {
            if r.region.peers.iter().any(|p| p.id == leader.id) {
                r.leader = Some(leader);
            } else {
                // The leader is a peer we do not know: the region changed.
                let k = r.region.start_key.clone();
                m.remove(&k);
            }
        }
    }

    /// Tries the next voter after a failure to reach `failed`.
    pub fn switch_peer(&self, region_id: u64, failed: &metapb::Peer) {
        let mut m = self.regions.write();
        if let Some(r) = m.values_mut().find(|r| r.region.id == region_id) {
            let voters: Vec<_> = r
                .region
                .peers
                .iter()
                .filter(|p| p.role == 0)
                .cloned()
                .collect();
            if let Some(pos) = voters.iter().position(|p| p.id == failed.id) {
                r.leader = voters.get((pos + 1) % voters.len()).cloned();
            } else {
                r.leader = voters.first().cloned();
            }
        }
    }

    /// Repairs the cache from a region error. Returns whether a retry makes sense at once
    /// (otherwise back off first).
    pub fn on_region_error(&self, region: &CachedRegion, e: &errorpb::Error) -> bool {
        if let Some(nl) = &e.not_leader {
            return match &nl.leader {
                Some(l) if l.id != 0 => {
                    self.update_leader(region.region.id, *l);
                    true
                }
                _ => {
                    if let Some(p) = region.target() {
                        self.switch_peer(region.region.id, &p);
                    }
                    false
                }
            };
        }
        if let Some(en) = &e.epoch_not_match {
            self.invalidate(region.region.id);
            for r in &en.current_regions {
                self.insert(CachedRegion {
                    region: r.clone(),
                    leader: None,
                });
            }
            return true;
        }
        if e.key_not_in_region.is_some() || e.region_not_found.is_some() {
            self.invalidate(region.region.id);
            return true;
        }
        if e.store_not_match.is_some() {
            if let Some(p) = region.target() {
                self.stores.write().remove(&p.store_id);
            }
            self.invalidate(region.region.id);
            return true;
        }
        false
    }

    pub async fn store_addr(&self, store_id: u64) -> Result<String> {
        if let Some(a) = self.stores.read().get(&store_id) {
            return Ok(a.clone());
        }
        let s = self.pd.get_store(store_id).await?;
        if s.state == metapb::StoreState::Tombstone as i32 {
            return Err(Error::Region(format!("store {store_id} is tombstone")));
        }
        self.stores.write().insert(store_id, s.address.clone());
        Ok(s.address)
    }

    pub fn invalidate_store(&self, store_id: u64) {
        self.stores.write().remove(&store_id);
    }

    /// Every cached region (for tests and diagnostics).
    pub fn cached(&self) -> Vec<CachedRegion> {
        self.regions.read().values().cloned().collect()
    }
}

impl CachedRegion {
    /// Whether the region holds keys just before `end` (it ends at or after `end`).
    fn contains_before(&self, end: &[u8]) -> bool {
        self.region.start_key.as_slice() < end
            && (self.region.end_key.is_empty() || self.region.end_key.as_slice() >= end)
    }
}
