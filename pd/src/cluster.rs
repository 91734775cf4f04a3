//! The cluster as the PD leader sees it: the replicated metadata (stores, regions, ids, TSO,
//! GC safe point) plus what only the current leader tracks (store statistics and liveness,
//! region statistics, the stores' heartbeat streams), and the operations of the PD API.

use crate::config::PdConfig;
use crate::id::{FreshIds, IdAllocator};
use crate::raft_node::{NodeError, RaftNode};
use crate::schedule::coordinator::Coordinator;
use crate::schedule::{ClusterSnapshot, RegionView, StoreView};
use crate::state::{
    self, region_key, store_key, u64_value, MetaState, KEY_BOOTSTRAPPED, KEY_CLUSTER_ID, KEY_GC,
};
use crate::tso::Tso;
use atoll_proto::pdpb::{self, PdCommand, PdKv, RegionRecord};
use atoll_proto::{metapb, Message};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Errors of the PD API, mapped to `pdpb::ErrorType` in one place (the service).
#[derive(Debug, thiserror::Error)]
pub enum PdError {
    #[error("not leader")]
    NotLeader,
    #[error("cluster is not bootstrapped")]
    NotBootstrapped,
    #[error("cluster is already bootstrapped")]
    AlreadyBootstrapped,
    #[error("store {0} is tombstone")]
    StoreTombstone(u64),
    #[error("store {0} not found")]
    StoreNotFound(u64),
    #[error("region not found")]
    RegionNotFound,
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    ClusterMismatch(String),
    #[error("{0}")]
    Other(String),
}

impl From<NodeError> for PdError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::NotLeader => PdError::NotLeader,
            e => PdError::Other(e.to_string()),
        }
    }
}

pub type PdResult<T> = Result<T, PdError>;

pub type StreamTx = mpsc::Sender<Result<pdpb::RegionHeartbeatResponse, tonic::Status>>;

#[derive(Clone, Debug, Default)]
pub struct RegionStat {
    pub approximate_size: u64,
    pub approximate_keys: u64,
    /// Peers the leader reports down, with how long (seconds, as of `reported_at`).
    pub down_peers: Vec<(u64, u64)>,
    pub reported_at: Option<Instant>,
    pub pending_peers: Vec<u64>,
    pub bytes_written: u64,
}

#[derive(Default)]
struct Volatile {
    epoch: u64,
    since: Option<Instant>,
    store_stats: HashMap<u64, pdpb::StoreStats>,
    store_last_hb: HashMap<u64, Instant>,
    /// Stores asked for a report of every region they lead, during this leadership and since
    /// their heartbeat stream last (re)opened.
    full_round_asked: std::collections::HashSet<u64>,
    region_stats: HashMap<u64, RegionStat>,
    streams: HashMap<u64, StreamTx>,
    last_resend: Option<Instant>,
    /// Where the next slice of the region patrol starts (a start key; empty: the first).
    patrol_cursor: Vec<u8>,
}

atoll_util::metric!(
    /// Region heartbeats this PD member received as leader.
    static REGION_HEARTBEATS: atoll_util::metrics::IntCounter = int_counter(
        "atoll_pd_region_heartbeats_total",
        "Region heartbeats received as leader"
    )
);

/// Regions each scheduling round checks: a full patrol of N regions takes N / PATROL_BATCH
/// rounds (`schedule-interval` apart), so a round's cost does not grow with the cluster.
const PATROL_BATCH: usize = 4096;

pub struct Cluster {
    pub node: Arc<RaftNode>,
    pub cfg: PdConfig,
    pub ids: IdAllocator,
    pub tso: Tso,
    vol: RwLock<Volatile>,
    pub coord: Mutex<Coordinator>,
    /// Regions whose record changed and is not yet persisted (never lost: a set, not a queue).
    dirty: Mutex<std::collections::HashSet<u64>>,
    dirty_notify: tokio::sync::Notify,
    bootstrap_lock: tokio::sync::Mutex<()>,
    /// Members' info learnt from their raft traffic (before it is persisted).
    pub peer_members: RwLock<HashMap<u64, pdpb::Member>>,
    pub self_member: pdpb::Member,
}

impl Cluster {
    pub fn new(node: Arc<RaftNode>, cfg: PdConfig, self_member: pdpb::Member) -> Arc<Self> {
        Arc::new(Cluster {
            ids: IdAllocator::new(node.clone()),
            tso: Tso::new(node.clone(), cfg.tso.save_interval.0),
            coord: Mutex::new(Coordinator::new(cfg.schedule.clone())),
            node,
            cfg,
            vol: RwLock::new(Volatile::default()),
            dirty: Mutex::new(std::collections::HashSet::new()),
            dirty_notify: tokio::sync::Notify::new(),
            bootstrap_lock: tokio::sync::Mutex::new(()),
            peer_members: RwLock::new(HashMap::new()),
            self_member,
        })
    }

    fn mark_dirty(&self, region_id: u64) {
        self.dirty.lock().insert(region_id);
        self.dirty_notify.notify_one();
    }

    pub fn cluster_id(&self) -> u64 {
        self.node.state.read().cluster_id
    }

    pub fn is_leader(&self) -> bool {
        self.node.status.is_ready_leader()
    }

    pub fn ensure_leader(&self) -> PdResult<()> {
        if self.is_leader() {
            self.refresh_volatile();
            Ok(())
        } else {
            Err(PdError::NotLeader)
        }
    }

    /// Volatile state belongs to one leadership: start afresh when it changes.
    fn refresh_volatile(&self) {
        let epoch = self
            .node
            .status
            .leader_epoch
            .load(std::sync::atomic::Ordering::Acquire);
        if self.vol.read().epoch == epoch {
            return;
        }
        let mut v = self.vol.write();
        if v.epoch != epoch {
            *v = Volatile {
                epoch,
                since: Some(Instant::now()),
                ..Default::default()
            };
            *self.coord.lock() = Coordinator::new(self.cfg.schedule.clone());
        }
    }

    pub fn leader_member(&self) -> Option<pdpb::Member> {
        let id = self.node.status.leader_id();
        if id == 0 {
            return None;
        }
        if id == self.self_member.member_id {
            return Some(self.self_member.clone());
        }
        if let Some(m) = self.node.state.read().members.get(&id) {
            return Some(m.clone());
        }
        self.peer_members.read().get(&id).cloned()
    }

    pub fn members(&self) -> Vec<pdpb::Member> {
        let mut m: HashMap<u64, pdpb::Member> = self.node.state.read().members.clone();
        for (id, x) in self.peer_members.read().iter() {
            m.entry(*id).or_insert_with(|| x.clone());
        }
        m.insert(self.self_member.member_id, self.self_member.clone());
        let mut v: Vec<_> = m.into_values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    async fn propose(&self, puts: Vec<(Vec<u8>, Vec<u8>)>) -> PdResult<()> {
        let cmd = PdCommand {
            puts: puts
                .into_iter()
                .map(|(key, value)| PdKv { key, value })
                .collect(),
            deletes: vec![],
        };
        Ok(self.node.propose(cmd).await?)
    }

    /// Once leader: make sure the cluster id and this member's record are persisted.
    pub async fn on_leader(&self) -> PdResult<()> {
        let (has_id, has_me) = {
            let st = self.node.state.read();
            (
                st.cluster_id != 0,
                st.members.get(&self.self_member.member_id) == Some(&self.self_member),
            )
        };
        let mut puts = vec![];
        if !has_id {
            let id = (atoll_util::unix_millis() << 20) | (rand::random::<u64>() & 0xfffff);
            puts.push((KEY_CLUSTER_ID.to_vec(), u64_value(id)));
        }
        if !has_me {
            puts.push((
                state::member_key(self.self_member.member_id),
                self.self_member.encode_to_vec(),
            ));
        }
        let others: Vec<pdpb::Member> = {
            let st = self.node.state.read();
            self.peer_members
                .read()
                .values()
                .filter(|m| st.members.get(&m.member_id) != Some(m))
                .cloned()
                .collect()
        };
        for m in others {
            puts.push((state::member_key(m.member_id), m.encode_to_vec()));
        }
        if puts.is_empty() {
            return Ok(());
        }
        self.propose(puts).await
    }

    // ---------------- bootstrap and stores ----------------

    pub fn is_bootstrapped(&self) -> bool {
        self.node.state.read().bootstrapped
    }

    pub async fn bootstrap(&self, store: metapb::Store, region: metapb::Region) -> PdResult<()> {
        self.ensure_leader()?;
        let _g = self.bootstrap_lock.lock().await;
        if self.is_bootstrapped() {
            return Err(PdError::AlreadyBootstrapped);
        }
        if store.id == 0 || store.address.is_empty() {
            return Err(PdError::Invalid(
                "bootstrap needs a store with an id and an address".into(),
            ));
        }
        if region.id == 0
            || region.peers.len() != 1
            || region.peers[0].store_id != store.id
            || !region.start_key.is_empty()
            || !region.end_key.is_empty()
        {
            return Err(PdError::Invalid(
                "the first region covers every key with one peer on the bootstrapping store".into(),
            ));
        }
        let rec = RegionRecord {
            region: Some(region),
            leader: None,
            leader_term: 0,
        };
        self.propose(vec![
            (
                store_key(store.id),
                metapb::Store {
                    state: metapb::StoreState::Up as i32,
                    ..store.clone()
                }
                .encode_to_vec(),
            ),
            (
                region_key(rec.region.as_ref().map_or(0, |r| r.id)),
                rec.encode_to_vec(),
            ),
            (KEY_BOOTSTRAPPED.to_vec(), b"1".to_vec()),
        ])
        .await?;
        tracing::info!(store_id = store.id, "cluster bootstrapped");
        Ok(())
    }

    pub async fn put_store(&self, mut store: metapb::Store) -> PdResult<()> {
        self.ensure_leader()?;
        if store.id == 0 {
            return Err(PdError::Invalid("store id must not be 0".into()));
        }
        if store.address.is_empty() {
            return Err(PdError::Invalid(format!(
                "store {} has no address",
                store.id
            )));
        }
        let existing = {
            let st = self.node.state.read();
            if let Some(other) = st.stores.values().find(|s| {
                s.address == store.address
                    && s.id != store.id
                    && s.state != metapb::StoreState::Tombstone as i32
            }) {
                return Err(PdError::ClusterMismatch(format!(
                    "address {} already belongs to store {}; store {} may not claim it",
                    store.address, other.id, store.id
                )));
            }
            st.stores.get(&store.id).cloned()
        };
        if let Some(old) = &existing {
            if old.state == metapb::StoreState::Tombstone as i32 {
                return Err(PdError::StoreTombstone(store.id));
            }
            store.state = old.state;
        } else {
            store.state = metapb::StoreState::Up as i32;
        }
        store.last_heartbeat_ms = 0;
        if existing.as_ref() == Some(&store) {
            return Ok(());
        }
        self.propose(vec![(store_key(store.id), store.encode_to_vec())])
            .await
    }

    pub fn get_store(&self, id: u64) -> PdResult<(metapb::Store, Option<pdpb::StoreStats>)> {
        self.ensure_leader()?;
        let s = self
            .node
            .state
            .read()
            .stores
            .get(&id)
            .cloned()
            .ok_or(PdError::StoreNotFound(id))?;
        Ok((s, self.vol.read().store_stats.get(&id).cloned()))
    }

    pub fn store_infos(&self, exclude_tombstone: bool) -> PdResult<Vec<pdpb::StoreInfo>> {
        self.ensure_leader()?;
        let snap = self.stores_snapshot();
        let st = self.node.state.read();
        let v = self.vol.read();
        let mut out: Vec<pdpb::StoreInfo> = st
            .stores
            .values()
            .filter(|s| !(exclude_tombstone && s.state == metapb::StoreState::Tombstone as i32))
            .map(|s| {
                let view = snap.stores.get(&s.id);
                let mut store = s.clone();
                store.last_heartbeat_ms = v.store_last_hb.get(&s.id).map_or(0, |t| {
                    atoll_util::unix_millis().saturating_sub(t.elapsed().as_millis() as u64)
                });
                pdpb::StoreInfo {
                    store: Some(store),
                    stats: v.store_stats.get(&s.id).cloned(),
                    region_count: view.map_or(0, |x| x.region_count as u64),
                    leader_count: view.map_or(0, |x| x.leader_count as u64),
                    is_down: view.is_none_or(|x| !x.is_up),
                }
            })
            .collect();
        out.sort_by_key(|i| i.store.as_ref().map_or(0, |s| s.id));
        Ok(out)
    }

    pub fn store_heartbeat(
        &self,
        stats: pdpb::StoreStats,
    ) -> PdResult<pdpb::StoreHeartbeatResponse> {
        self.ensure_leader()?;
        let id = stats.store_id;
        let store = self
            .node
            .state
            .read()
            .stores
            .get(&id)
            .cloned()
            .ok_or(PdError::StoreNotFound(id))?;
        if store.state == metapb::StoreState::Tombstone as i32 {
            return Err(PdError::StoreTombstone(id));
        }
        let require_region_reports = {
            let mut v = self.vol.write();
            v.store_last_hb.insert(id, Instant::now());
            v.store_stats.insert(id, stats);
            // Regions report on change only: a new leadership asks each store for a full round
            // (its persisted records may lag what the last leader heard), and so does a
            // heartbeat stream that reopened (reports in the broken one may be lost).
            v.full_round_asked.insert(id)
        };
        Ok(pdpb::StoreHeartbeatResponse {
            header: None,
            gc_safe_point: self.node.state.read().gc_safe_point,
            state: store.state,
            require_region_reports,
        })
    }

    /// Marks a store offline: PD moves its peers away, then makes it tombstone.
    pub async fn delete_store(&self, id: u64) -> PdResult<()> {
        self.ensure_leader()?;
        let store = self
            .node
            .state
            .read()
            .stores
            .get(&id)
            .cloned()
            .ok_or(PdError::StoreNotFound(id))?;
        match metapb::StoreState::try_from(store.state).unwrap_or(metapb::StoreState::Up) {
            metapb::StoreState::Tombstone => Err(PdError::StoreTombstone(id)),
            metapb::StoreState::Offline => Ok(()),
            metapb::StoreState::Up => {
                let schedulable = self
                    .stores_snapshot()
                    .stores
                    .values()
                    .filter(|s| s.id != id && s.is_schedulable())
                    .count();
                if schedulable < self.cfg.schedule.max_replicas {
                    return Err(PdError::Invalid(format!(
                        "removing store {id} would leave {schedulable} stores for {} replicas",
                        self.cfg.schedule.max_replicas
                    )));
                }
                let s = metapb::Store {
                    state: metapb::StoreState::Offline as i32,
                    ..store
                };
                self.propose(vec![(store_key(id), s.encode_to_vec())])
                    .await?;
                tracing::info!(store_id = id, "store marked offline");
                Ok(())
            }
        }
    }

    // ---------------- regions ----------------

    pub fn register_stream(&self, store_id: u64, tx: StreamTx) {
        let mut v = self.vol.write();
        v.streams.insert(store_id, tx);
        v.full_round_asked.remove(&store_id);
    }

    pub fn region_heartbeat(
        &self,
        req: pdpb::RegionHeartbeatRequest,
    ) -> PdResult<Option<pdpb::RegionHeartbeatResponse>> {
        self.ensure_leader()?;
        REGION_HEARTBEATS.inc();
        let region = req
            .region
            .clone()
            .ok_or_else(|| PdError::Invalid("heartbeat without region".into()))?;
        let leader = req
            .leader
            .ok_or_else(|| PdError::Invalid("heartbeat without leader".into()))?;
        if region.id == 0
            || region.region_epoch.is_none()
            || !region.peers.iter().any(|p| p.id == leader.id)
        {
            return Err(PdError::Invalid(format!(
                "malformed heartbeat of region {}",
                region.id
            )));
        }
        {
            let st = self.node.state.read();
            match st.stores.get(&leader.store_id) {
                None => return Err(PdError::StoreNotFound(leader.store_id)),
                Some(s) if s.state == metapb::StoreState::Tombstone as i32 => {
                    return Err(PdError::StoreTombstone(s.id))
                }
                _ => {}
            }
        }
        let rec = RegionRecord {
            region: Some(region.clone()),
            leader: Some(leader),
            leader_term: req.term,
        };
        let upd = self.node.state.write().regions.update(rec.clone());
        if upd.stale {
            return Ok(None);
        }
        {
            let mut v = self.vol.write();
            for gone in &upd.removed {
                v.region_stats.remove(gone);
            }
            let stat = v.region_stats.entry(region.id).or_default();
            stat.approximate_size = req.approximate_size;
            stat.approximate_keys = req.approximate_keys;
            stat.down_peers = req
                .down_peers
                .iter()
                .filter_map(|d| d.peer.as_ref().map(|p| (p.id, d.down_seconds)))
                .collect();
            stat.reported_at = Some(Instant::now());
            stat.pending_peers = req.pending_peers.iter().map(|p| p.id).collect();
            stat.bytes_written = req.bytes_written;
            v.store_last_hb
                .entry(leader.store_id)
                .or_insert_with(Instant::now);
        }
        if upd.epoch_changed || upd.leader_changed {
            self.mark_dirty(region.id);
        }
        // O(stores + log regions): the stores with their kept counts and this one region,
        // never a copy of the whole cluster.
        let (snap, view) = {
            let st = self.node.state.read();
            let v = self.vol.read();
            let Some(view) = st
                .regions
                .get(region.id)
                .and_then(|rec| self.region_view(rec, &v))
            else {
                return Ok(None);
            };
            (self.partial_snapshot(&st, &v, std::iter::empty()), view)
        };
        Ok(self
            .coord
            .lock()
            .on_region(&snap, &view, &mut FreshIds(&self.ids)))
    }

    pub fn get_region(&self, key: &[u8]) -> PdResult<RegionRecord> {
        self.ensure_leader()?;
        self.node
            .state
            .read()
            .regions
            .search(key)
            .cloned()
            .ok_or(PdError::RegionNotFound)
    }

    pub fn get_prev_region(&self, key: &[u8]) -> PdResult<RegionRecord> {
        self.ensure_leader()?;
        self.node
            .state
            .read()
            .regions
            .search_prev(key)
            .cloned()
            .ok_or(PdError::RegionNotFound)
    }

    pub fn get_region_by_id(&self, id: u64) -> PdResult<Option<RegionRecord>> {
        self.ensure_leader()?;
        Ok(self.node.state.read().regions.get(id).cloned())
    }

    pub fn scan_regions(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> PdResult<Vec<RegionRecord>> {
        self.ensure_leader()?;
        Ok(self
            .node
            .state
            .read()
            .regions
            .scan(start, end, limit)
            .into_iter()
            .cloned()
            .collect())
    }

    pub async fn ask_batch_split(
        &self,
        region: metapb::Region,
        count: u32,
    ) -> PdResult<Vec<pdpb::SplitId>> {
        self.ensure_leader()?;
        if count == 0 || count > 10_000 {
            return Err(PdError::Invalid(format!(
                "split count {count} out of range"
            )));
        }
        if region.peers.is_empty() {
            return Err(PdError::Invalid("split of a region without peers".into()));
        }
        let per = 1 + region.peers.len() as u32;
        let first = self.ids.alloc(count * per).await?;
        let mut next = first;
        let mut out = vec![];
        for _ in 0..count {
            let new_region_id = next;
            next += 1;
            let new_peer_ids = (0..region.peers.len()).map(|i| next + i as u64).collect();
            next += region.peers.len() as u64;
            out.push(pdpb::SplitId {
                new_region_id,
                new_peer_ids,
            });
        }
        Ok(out)
    }

    pub fn report_batch_split(&self, regions: Vec<metapb::Region>) -> PdResult<()> {
        self.ensure_leader()?;
        for r in regions {
            let id = r.id;
            let rec = RegionRecord {
                region: Some(r),
                leader: None,
                leader_term: 0,
            };
            let upd = self.node.state.write().regions.update(rec);
            if upd.epoch_changed {
                self.mark_dirty(id);
            }
        }
        Ok(())
    }

    pub async fn update_gc_safe_point(&self, sp: u64) -> PdResult<u64> {
        self.ensure_leader()?;
        let cur = self.node.state.read().gc_safe_point;
        if sp <= cur {
            return Ok(cur);
        }
        self.propose(vec![(KEY_GC.to_vec(), u64_value(sp))]).await?;
        Ok(sp)
    }

    /// Moves the safe point up to `now - life_time` (never down).
    pub async fn advance_gc_safe_point(&self, life_time: Duration) -> PdResult<u64> {
        let (physical, _) = self.tso.alloc(1).await?;
        let sp_ms = physical.saturating_sub(life_time.as_millis() as i64);
        if sp_ms <= 0 {
            return self.gc_safe_point();
        }
        // Same layout as the TSO: physical milliseconds << 18 | logical.
        self.update_gc_safe_point((sp_ms as u64) << 18).await
    }

    pub fn gc_safe_point(&self) -> PdResult<u64> {
        self.ensure_leader()?;
        Ok(self.node.state.read().gc_safe_point)
    }

    // ---------------- scheduling ----------------

    /// The stores as the schedulers see them (health, and peer and leader counts kept by the
    /// region tree), with views of `regions` only: never a copy of the whole cluster.
    fn partial_snapshot<'a>(
        &self,
        st: &MetaState,
        v: &Volatile,
        regions: impl Iterator<Item = &'a RegionRecord>,
    ) -> ClusterSnapshot {
        let mut snap = ClusterSnapshot {
            stores: self.store_views(st, v),
            regions: regions.filter_map(|rec| self.region_view(rec, v)).collect(),
        };
        for s in snap.stores.values_mut() {
            let c = st.regions.store_count(s.id);
            s.region_count = c.regions;
            s.leader_count = c.leaders;
        }
        snap
    }

    /// The stores with their counts (no region).
    fn stores_snapshot(&self) -> ClusterSnapshot {
        let st = self.node.state.read();
        let v = self.vol.read();
        self.partial_snapshot(&st, &v, std::iter::empty())
    }

    /// Every store's state and health (counts left at zero).
    fn store_views(&self, st: &MetaState, v: &Volatile) -> HashMap<u64, StoreView> {
        let since = v.since.unwrap_or_else(Instant::now);
        let disconnect = self.cfg.schedule.store_disconnect_time.0;
        let down = self.cfg.schedule.max_store_down_time.0;
        let mut stores = HashMap::with_capacity(st.stores.len());
        for s in st.stores.values() {
            // A store never heard from during this leadership counts from its start.
            let silent = v
                .store_last_hb
                .get(&s.id)
                .copied()
                .unwrap_or(since)
                .elapsed();
            stores.insert(
                s.id,
                StoreView {
                    id: s.id,
                    state: s.state,
                    is_up: silent < disconnect,
                    is_down: silent >= down,
                    ..Default::default()
                },
            );
        }
        stores
    }

    /// One region as the schedulers see it: its record and what its leader last reported.
    fn region_view(&self, rec: &RegionRecord, v: &Volatile) -> Option<RegionView> {
        let down = self.cfg.schedule.max_store_down_time.0;
        let region = rec.region.clone()?;
        let stat = v.region_stats.get(&region.id).cloned().unwrap_or_default();
        // A peer its leader reports down is replaced only once it has been down for
        // max-store-down-time, as a down store is (a restart or a short partition must not
        // move data).
        let since_report = stat.reported_at.map_or(0, |t| t.elapsed().as_secs());
        let long_down_peers = stat
            .down_peers
            .iter()
            .filter(|(_, secs)| secs + since_report >= down.as_secs())
            .map(|(id, _)| *id)
            .collect();
        Some(RegionView {
            region,
            leader: rec.leader,
            approximate_size: stat.approximate_size,
            down_peers: stat.down_peers.iter().map(|(id, _)| *id).collect(),
            long_down_peers,
            pending_peers: stat.pending_peers,
        })
    }

    /// Sends a step to the region's leader over its store's heartbeat stream.
    fn push(&self, resp: pdpb::RegionHeartbeatResponse) {
        let leader = self
            .node
            .state
            .read()
            .regions
            .get(resp.region_id)
            .and_then(|rec| rec.leader);
        let Some(store) = leader.map(|l| l.store_id) else {
            return;
        };
        let tx = self.vol.read().streams.get(&store).cloned();
        if let Some(tx) = tx {
            let _ = tx.try_send(Ok(resp));
        }
    }

    /// One scheduling round (leader only).
    pub async fn tick(&self) {
        if self.ensure_leader().is_err() {
            return;
        }
        // Keep ids for new peers at hand (persisted ahead), taken in order from the allocator:
        // a pool drawn from later would hand out ids smaller than a split's made meanwhile.
        if let Err(e) = self.ids.reserve(256).await {
            tracing::debug!(error = %e, "reserve ids");
        }
        // The next slice of the region patrol (in key order, wrapping around), with the stores.
        let snap = {
            let st = self.node.state.read();
            let mut v = self.vol.write();
            let (slice, next) = st.regions.patrol(&v.patrol_cursor, PATROL_BATCH);
            v.patrol_cursor = next;
            self.partial_snapshot(&st, &v, slice.into_iter())
        };
        let steps = self.coord.lock().tick(&snap, &mut FreshIds(&self.ids));
        for s in steps {
            self.push(s);
        }
        // Re-send running steps now and then (a step or its result may have been lost).
        let resend = {
            let mut v = self.vol.write();
            let due = v
                .last_resend
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(3));
            if due {
                v.last_resend = Some(Instant::now());
            }
            due
        };
        if resend {
            let lookup = |id: u64| {
                let st = self.node.state.read();
                let v = self.vol.read();
                st.regions.get(id).and_then(|rec| self.region_view(rec, &v))
            };
            let steps = self.coord.lock().running_steps(&lookup);
            for s in steps {
                self.push(s);
            }
        }
        // Offline stores that hold nothing any more become tombstone.
        for s in snap.stores.values() {
            if s.is_offline() && s.region_count == 0 {
                let store = self.node.state.read().stores.get(&s.id).cloned();
                if let Some(store) = store {
                    let t = metapb::Store {
                        state: metapb::StoreState::Tombstone as i32,
                        ..store
                    };
                    if self
                        .propose(vec![(store_key(s.id), t.encode_to_vec())])
                        .await
                        .is_ok()
                    {
                        tracing::info!(store_id = s.id, "store is tombstone");
                    }
                }
            }
        }
    }

    /// Persists changed region records in batches (leader only). A record is read at the time
    /// it is persisted, so a region changed many times is written once.
    pub async fn run_persister(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        const BATCH: usize = 4096;
        loop {
            tokio::select! {
                _ = self.dirty_notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop.changed() => return,
            }
            loop {
                let ids: Vec<u64> = {
                    let mut d = self.dirty.lock();
                    let ids: Vec<u64> = d.iter().take(BATCH).copied().collect();
                    for id in &ids {
                        d.remove(id);
                    }
                    ids
                };
                if ids.is_empty() {
                    break;
                }
                if !self.is_leader() {
                    // The next leader persists what it learns from heartbeats itself.
                    break;
                }
                let puts: Vec<(Vec<u8>, Vec<u8>)> = {
                    let st = self.node.state.read();
                    ids.iter()
                        .filter_map(|id| {
                            st.regions
                                .get(*id)
                                .map(|r| (region_key(*id), r.encode_to_vec()))
                        })
                        .collect()
                };
                if let Err(e) = self.propose(puts).await {
                    tracing::debug!(error = %e, "persist region records");
                    let mut d = self.dirty.lock();
                    d.extend(ids);
                    break;
                }
            }
        }
    }
}
