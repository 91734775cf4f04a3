//! An in-process Atoll cluster for tests: N stores (each its own RocksDB in a temp dir) joined
//! by a simulated network with filters, and an in-memory PD.
//!
//! | module | owns |
//! | --- | --- |
//! | this file | [`Cluster`]: start, stop, restart stores; `must_*` helpers that assert |
//! | [`mock_pd`] | [`MockPd`], the in-memory placement driver |
//! | [`transport`] | [`SimNetwork`] and its filters |
//!
//! Helpers wait on conditions with deadlines (`wait_until`), never fixed sleeps.
//! Data written by the `must_*` helpers is raw (column family `default`, key = the encoded
//! user key): these tests exercise the raftstore below the transaction layer.

pub mod mock_pd;
pub mod transport;

pub use mock_pd::MockPd;
pub use transport::{
    Delay, DropAll, DropPath, DropRandomly, DropType, Filter, IsolateStore, Partition, RegionOnly,
    SimNetwork, SimTransport, Verdict,
};

use atoll_engine::{Peekable, CF_DEFAULT};
use atoll_engine_rocks::{RocksConfig, RocksEngine};
use atoll_pd_client::PdClient;
use atoll_proto::metapb;
use atoll_proto::raft_cmdpb::{
    self, AdminCmdType, AdminRequest, CmdType, RaftCmdRequest, RaftRequestHeader,
};
use atoll_raftstore::msg::CasualMessage;
use atoll_raftstore::snap::SnapManager;
use atoll_raftstore::{Config, Error, RaftRouter, RaftStore, RegionId, StoreDeps, StoreId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub type Engine = RocksEngine;

/// Polls `f` until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A configuration that suits fast tests: short ticks, small caches.
pub fn test_config() -> Config {
    Config {
        raft_base_tick_interval: atoll_util::config::ReadableDuration::millis(20),
        raft_election_timeout_ticks: 10,
        raft_heartbeat_ticks: 2,
        raft_log_gc_tick_ticks: 10,
        pd_heartbeat_interval: atoll_util::config::ReadableDuration::secs(2),
        pd_store_heartbeat_interval: atoll_util::config::ReadableDuration::secs(1),
        ..Config::default()
    }
}

struct Node {
    store: RaftStore<Engine>,
    router: RaftRouter<Engine>,
}

pub struct Cluster {
    pub count: usize,
    pub cfg: Config,
    pub pd: Arc<MockPd>,
    pub net: Arc<SimNetwork<Engine>>,
    pub runtime: tokio::runtime::Runtime,
    dirs: HashMap<u64, tempfile::TempDir>,
    engines: HashMap<u64, Engine>,
    nodes: HashMap<u64, Node>,
    pub store_ids: Vec<u64>,
    rocks: RocksConfig,
}

impl Cluster {
    pub fn new(count: usize) -> Self {
        Self::with_config(count, test_config())
    }

    pub fn with_config(count: usize, cfg: Config) -> Self {
        atoll_util::logging::init("warn");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("test-cluster")
            .build()
            .expect("runtime");
        let rocks = RocksConfig {
            block_cache_size: 16 << 20,
            write_buffer_size: 8 << 20,
            raft_write_buffer_size: 8 << 20,
            ..RocksConfig::default()
        };
        Cluster {
            count,
            cfg,
            pd: Arc::new(MockPd::new()),
            net: SimNetwork::new(),
            runtime,
            dirs: HashMap::new(),
            engines: HashMap::new(),
            nodes: HashMap::new(),
            store_ids: vec![],
            rocks,
        }
    }

    /// Creates the stores, bootstraps one region covering every key with a peer on each store,
    /// and starts them all.
    pub fn run(&mut self) {
        self.bootstrap(self.count);
        for id in self.store_ids.clone() {
            self.start_store(id);
        }
    }

    /// Like [`run`](Self::run) but the first region has peers on the first `peers` stores only.
    pub fn run_with_peers(&mut self, peers: usize) {
        self.bootstrap(peers);
        for id in self.store_ids.clone() {
            self.start_store(id);
        }
    }

    fn bootstrap(&mut self, peers: usize) {
        for i in 0..self.count {
            let id = i as u64 + 1;
            let dir = tempfile::Builder::new()
                .prefix(&format!("atoll-store{id}-"))
                .tempdir()
                .expect("tempdir");
            let engine =
                RocksEngine::open(dir.path().join("db"), &self.rocks).expect("open engine");
            atoll_raftstore::bootstrap::write_store_ident(
                &engine,
                &atoll_proto::raft_serverpb::StoreIdent {
                    cluster_id: 1,
                    store_id: id,
                },
            )
            .expect("store ident");
            self.dirs.insert(id, dir);
            self.engines.insert(id, engine);
            self.store_ids.push(id);
            let store = metapb::Store {
                id,
                address: format!("store{id}"),
                ..Default::default()
            };
            self.runtime
                .block_on(self.pd.put_store(store))
                .expect("put store");
        }
        let region = metapb::Region {
            id: 1,
            start_key: vec![],
            end_key: vec![],
            region_epoch: Some(metapb::RegionEpoch {
                conf_ver: 1,
                version: 1,
            }),
            peers: self.store_ids[..peers]
                .iter()
                .map(|s| metapb::Peer {
                    id: self.pd.alloc(),
                    store_id: *s,
                    role: 0,
                })
                .collect(),
        };
        for p in &region.peers {
            atoll_raftstore::bootstrap::prepare_bootstrap_region(
                &self.engines[&p.store_id],
                &region,
            )
            .expect("bootstrap region");
        }
        let first = metapb::Store {
            id: self.store_ids[0],
            ..Default::default()
        };
        self.runtime
            .block_on(self.pd.bootstrap_cluster(first, region))
            .expect("bootstrap");
    }

    pub fn start_store(&mut self, id: u64) {
        let engine = match self.engines.get(&id) {
            Some(e) => e.clone(),
            None => {
                let e = RocksEngine::open(self.dirs[&id].path().join("db"), &self.rocks)
                    .expect("reopen engine");
                self.engines.insert(id, e.clone());
                e
            }
        };
        let snap_mgr = SnapManager::new(self.dirs[&id].path().join("snap")).expect("snap dir");
        let deps = StoreDeps {
            store_id: StoreId(id),
            cfg: self.cfg.clone(),
            engine,
            trans: Arc::new(SimTransport::new(self.net.clone())),
            pd: self.pd.clone(),
            snap_mgr,
            runtime: self.runtime.handle().clone(),
            stats: Arc::new(atoll_proto::pdpb::StoreStats::default),
        };
        let store = RaftStore::start(deps).expect("start store");
        let router = store.router();
        self.net.add_router(id, router.clone());
        self.nodes.insert(id, Node { store, router });
    }

    /// Stops a store abruptly: threads stop, nothing more is sent; disk state stays.
    pub fn stop_store(&mut self, id: u64) {
        self.net.remove_router(id);
        if let Some(n) = self.nodes.remove(&id) {
            n.store.shutdown();
        }
        // Close the engine too, as a crashed process would.
        self.engines.remove(&id);
    }

    pub fn restart_store(&mut self, id: u64) {
        self.stop_store(id);
        self.start_store(id);
    }

    pub fn router(&self, store_id: u64) -> &RaftRouter<Engine> {
        &self.nodes[&store_id].router
    }

    pub fn running_stores(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.nodes.keys().copied().collect();
        v.sort();
        v
    }

    pub fn engine(&self, store_id: u64) -> &Engine {
        &self.engines[&store_id]
    }

    // ---------------- region lookup ----------------

    /// The freshest view of the region holding `key` among running stores.
    pub fn get_region(&self, key: &[u8]) -> metapb::Region {
        let mut best: Option<metapb::Region> = None;
        for n in self.nodes.values() {
            if let Some((r, _)) = n.router.region_for_key(key) {
                let newer = best.as_ref().is_none_or(|b| {
                    let (be, re) = (
                        b.region_epoch.unwrap_or_default(),
                        r.region_epoch.unwrap_or_default(),
                    );
                    re.version > be.version
                        || (re.version == be.version && re.conf_ver > be.conf_ver)
                });
                if newer {
                    best = Some(r);
                }
            }
        }
        best.unwrap_or_else(|| panic!("no store holds key {key:?}"))
    }

    pub fn region_by_id(&self, region_id: u64) -> Option<metapb::Region> {
        let mut best: Option<metapb::Region> = None;
        for n in self.nodes.values() {
            if let Some(r) = n.router.region(RegionId(region_id)) {
                let newer = best.as_ref().is_none_or(|b| {
                    let (be, re) = (
                        b.region_epoch.unwrap_or_default(),
                        r.region_epoch.unwrap_or_default(),
                    );
                    re.version > be.version || re.conf_ver > be.conf_ver
                });
                if newer {
                    best = Some(r);
                }
            }
        }
        best
    }

    /// The store whose peer leads `region_id` (highest term if several think they do).
    pub fn leader_store(&self, region_id: u64) -> Option<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.router.is_leader(RegionId(region_id)))
            .map(|(id, _)| *id)
            .next()
    }

    pub fn wait_leader(&self, region_id: u64, timeout: Duration) -> Option<u64> {
        let mut found = None;
        wait_until(timeout, || {
            found = self.leader_store(region_id);
            found.is_some()
        });
        found
    }

    // ---------------- commands ----------------

    pub fn header(&self, region: &metapb::Region) -> RaftRequestHeader {
        RaftRequestHeader {
            region_id: region.id,
            peer: None,
            region_epoch: region.region_epoch,
            keys: vec![],
        }
    }

    /// Proposes on whichever store leads the region; retries region errors until `timeout`.
    pub fn propose_with_retry(
        &self,
        key: &[u8],
        make: impl Fn(&metapb::Region) -> RaftCmdRequest,
        timeout: Duration,
    ) -> Result<atoll_raftstore::WriteResponse, Error> {
        let deadline = Instant::now() + timeout;
        let mut last = Error::Other("no attempt".into());
        while Instant::now() < deadline {
            let region = self.get_region(key);
            let Some(leader) = self.leader_store(region.id) else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            let router = self.router(leader).clone();
            let cmd = make(&region);
            match self.runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), router.propose_async(cmd)).await
            }) {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) if e.is_region_error() => last = e,
                Ok(Err(e)) => return Err(e),
                Err(_) => last = Error::Other("proposal timed out".into()),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(last)
    }

    /// A raw put of `key` (user key) in `region`'s default column family.
    pub fn put_cmd(&self, region: &metapb::Region, key: &[u8], value: &[u8]) -> RaftCmdRequest {
        RaftCmdRequest {
            header: Some(self.header(region)),
            requests: vec![raft_cmdpb::Request {
                cmd_type: CmdType::Put as i32,
                put: Some(raft_cmdpb::PutRequest {
                    cf: CF_DEFAULT.into(),
                    key: atoll_keys::data_key(key),
                    value: value.to_vec(),
                }),
                ..Default::default()
            }],
            admin_request: None,
        }
    }

    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        self.propose_with_retry(
            key,
            |r| self.put_cmd(r, key, value),
            Duration::from_secs(20),
        )
        .map(|_| ())
    }

    /// Proposes a put on one store only (whatever it believes about leadership).
    pub fn put_on(
        &self,
        store_id: u64,
        region: &metapb::Region,
        key: &[u8],
        value: &[u8],
        timeout: Duration,
    ) -> Result<(), Error> {
        let router = self.router(store_id).clone();
        let cmd = self.put_cmd(region, key, value);
        match self
            .runtime
            .block_on(async { tokio::time::timeout(timeout, router.propose_async(cmd)).await })
        {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(Error::Other("put timed out".into())),
        }
    }

    /// A read of `key` served by one store's leader lease alone: `None` when it has no valid
    /// lease (no message is sent either way).
    pub fn lease_read_on(
        &self,
        store_id: u64,
        region: &metapb::Region,
        key: &[u8],
    ) -> Option<Option<Vec<u8>>> {
        let snap = self.router(store_id).lease_read(&self.header(region))?;
        Some(
            snap.snap
                .get_value_cf(CF_DEFAULT, &atoll_keys::data_key(key))
                .expect("engine get"),
        )
    }

    pub fn must_put(&self, key: &[u8], value: &[u8]) {
        self.put(key, value)
            .unwrap_or_else(|e| panic!("put {key:?}: {e}"));
    }

    pub fn must_delete(&self, key: &[u8]) {
        let k = atoll_keys::data_key(key);
        self.propose_with_retry(
            key,
            |r| RaftCmdRequest {
                header: Some(self.header(r)),
                requests: vec![raft_cmdpb::Request {
                    cmd_type: CmdType::Delete as i32,
                    delete: Some(raft_cmdpb::DeleteRequest {
                        cf: CF_DEFAULT.into(),
                        key: k.clone(),
                    }),
                    ..Default::default()
                }],
                admin_request: None,
            },
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| panic!("delete {key:?}: {e}"));
    }

    /// A linearizable read through the region's leader (lease, or ReadIndex).
    pub fn get(&self, key: &[u8], timeout: Duration) -> Result<Option<Vec<u8>>, Error> {
        let deadline = Instant::now() + timeout;
        let mut last = Error::Other("no attempt".into());
        while Instant::now() < deadline {
            let region = self.get_region(key);
            let Some(leader) = self.leader_store(region.id) else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            let router = self.router(leader).clone();
            let header = self.header(&region);
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .runtime
                .block_on(async { tokio::time::timeout(left, router.read_async(header)).await })
            {
                Ok(Ok(snap)) => {
                    if !atoll_keys::in_range(key, &snap.region.start_key, &snap.region.end_key) {
                        last = Error::Other("region moved".into());
                        continue;
                    }
                    return Ok(snap
                        .snap
                        .get_value_cf(CF_DEFAULT, &atoll_keys::data_key(key))?);
                }
                Ok(Err(e)) if e.is_region_error() => last = e,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::Other("read timed out".into())),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(last)
    }

    pub fn must_get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.get(key, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("get {key:?}: {e}"))
    }

    pub fn must_get_equal(&self, key: &[u8], value: &[u8]) {
        assert_eq!(self.must_get(key).as_deref(), Some(value), "key {key:?}");
    }

    /// The value in one store's engine (no raft involved).
    pub fn get_on_store(&self, store_id: u64, key: &[u8]) -> Option<Vec<u8>> {
        self.engines[&store_id]
            .get_value_cf(CF_DEFAULT, &atoll_keys::data_key(key))
            .expect("engine get")
    }

    /// Waits until every store holding a peer of the key's region has `value`.
    pub fn must_replicated(&self, key: &[u8], value: &[u8], timeout: Duration) {
        let region = self.get_region(key);
        for p in &region.peers {
            if !self.nodes.contains_key(&p.store_id) {
                continue;
            }
            assert!(
                wait_until(timeout, || self.get_on_store(p.store_id, key).as_deref()
                    == Some(value)),
                "key {key:?} never reached store {}",
                p.store_id
            );
        }
    }

    fn admin(&self, region: &metapb::Region, admin: AdminRequest) -> RaftCmdRequest {
        RaftCmdRequest {
            header: Some(self.header(region)),
            requests: vec![],
            admin_request: Some(admin),
        }
    }

    pub fn change_peer(
        &self,
        region_id: u64,
        kind: raft_cmdpb::ConfChangeType,
        peer: metapb::Peer,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = Error::Other("no attempt".into());
        while Instant::now() < deadline {
            let Some(region) = self.region_by_id(region_id) else {
                return Err(Error::RegionNotFound(region_id));
            };
            let Some(leader) = self.leader_store(region_id) else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            let cmd = self.admin(
                &region,
                AdminRequest {
                    cmd_type: AdminCmdType::ChangePeer as i32,
                    change_peer: Some(raft_cmdpb::ChangePeerRequest {
                        change_type: kind as i32,
                        peer: Some(peer),
                    }),
                    ..Default::default()
                },
            );
            let router = self.router(leader).clone();
            match self.runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), router.propose_async(cmd)).await
            }) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(Error::ServerIsBusy(m))) => last = Error::ServerIsBusy(m),
                Ok(Err(e)) if e.is_region_error() => last = e,
                Ok(Err(e)) => return Err(e),
                Err(_) => last = Error::Other("timed out".into()),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(last)
    }

    /// Adds a voter on `store_id` (as a learner first, then promoted) and returns it.
    pub fn must_add_peer(&self, region_id: u64, store_id: u64) -> metapb::Peer {
        let peer = metapb::Peer {
            id: self.pd.alloc(),
            store_id,
            role: 1,
        };
        self.change_peer(region_id, raft_cmdpb::ConfChangeType::AddLearnerNode, peer)
            .unwrap_or_else(|e| panic!("add learner on store {store_id}: {e}"));
        let voter = metapb::Peer { role: 0, ..peer };
        self.change_peer(region_id, raft_cmdpb::ConfChangeType::AddNode, voter)
            .unwrap_or_else(|e| panic!("promote learner on store {store_id}: {e}"));
        voter
    }

    pub fn must_remove_peer(&self, region_id: u64, peer: metapb::Peer) {
        self.change_peer(region_id, raft_cmdpb::ConfChangeType::RemoveNode, peer)
            .unwrap_or_else(|e| panic!("remove peer {}: {e}", peer.id));
    }

    /// The admin command that asks a region's leader to hand leadership to `target`.
    pub fn transfer_leader_cmd(
        &self,
        region: &metapb::Region,
        target: metapb::Peer,
    ) -> RaftCmdRequest {
        self.admin(
            region,
            AdminRequest {
                cmd_type: AdminCmdType::TransferLeader as i32,
                transfer_leader: Some(raft_cmdpb::TransferLeaderRequest { peer: Some(target) }),
                ..Default::default()
            },
        )
    }

    pub fn must_transfer_leader(&self, region_id: u64, to_store: u64) {
        let ok = wait_until(Duration::from_secs(20), || {
            if self.leader_store(region_id) == Some(to_store) {
                return true;
            }
            let Some(region) = self.region_by_id(region_id) else {
                return false;
            };
            let Some(leader) = self.leader_store(region_id) else {
                return false;
            };
            let Some(target) = region
                .peers
                .iter()
                .find(|p| p.store_id == to_store)
                .cloned()
            else {
                return false;
            };
            let cmd = self.transfer_leader_cmd(&region, target);
            let router = self.router(leader).clone();
            let _ = self.runtime.block_on(router.propose_async(cmd));
            wait_until(Duration::from_millis(500), || {
                self.leader_store(region_id) == Some(to_store)
            })
        });
        assert!(
            ok,
            "leadership of region {region_id} never moved to store {to_store}"
        );
    }

    /// Splits the region holding `key` at `keys` and waits for the new regions to appear.
    pub fn must_split(&self, keys: &[&[u8]]) -> Vec<metapb::Region> {
        let first = keys[0];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let region = self.get_region(first);
            let leader = self.leader_store(region.id);
            if let Some(leader) = leader {
                let router = self.router(leader).clone();
                let ks: Vec<Vec<u8>> = keys.iter().map(|k| k.to_vec()).collect();
                let r = self.runtime.block_on(async {
                    tokio::time::timeout(
                        Duration::from_secs(10),
                        router.split_async(
                            RegionId(region.id),
                            region.region_epoch.unwrap_or_default(),
                            ks,
                        ),
                    )
                    .await
                });
                if let Ok(Ok(resp)) = r {
                    // The callback fires when the split is applied; the stores learn of the
                    // new regions right after. Wait until every one is known.
                    let ok = wait_until(Duration::from_secs(10), || {
                        resp.regions.iter().all(|r| {
                            self.region_by_id(r.id)
                                .is_some_and(|x| x.region_epoch == r.region_epoch)
                        })
                    });
                    assert!(ok, "split regions never showed up in the stores");
                    return resp.regions;
                }
            }
            assert!(
                Instant::now() < deadline,
                "split at {keys:?} never succeeded"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn must_compact_log(&self, region_id: u64, index: u64) {
        let leader = self
            .wait_leader(region_id, Duration::from_secs(10))
            .expect("leader");
        assert!(self
            .router(leader)
            .send_casual(RegionId(region_id), CasualMessage::CompactLog { index }));
    }

    /// Counts regions whose peers all exist and that have a leader.
    pub fn regions_with_leaders(&self) -> usize {
        let mut ids = std::collections::HashSet::new();
        for n in self.nodes.values() {
            for (r, leader) in n.router.regions() {
                if leader {
                    ids.insert(r.id);
                }
            }
        }
        ids.len()
    }

    pub fn shutdown(&mut self) {
        for id in self.running_stores() {
            self.stop_store(id);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}
