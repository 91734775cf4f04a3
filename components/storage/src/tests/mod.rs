//! Unit tests of [`Storage`] over in-process stores on the memory engine: each store is a real
//! raftstore (`atoll_engine::memory::MemoryEngine`), joined by the simulated network and the
//! mock PD of `atoll-test-cluster`; no sockets, no disk but the snapshot directories.
//!
//! The helpers here start clusters and run requests on the leader; `must_*` helpers assert
//! that the request succeeded. Test modules:
//!
//! | module | covers |
//! | --- | --- |
//! | [`storage_core`] | `storage.rs`: validation, admission permits, error conversions, region errors |
//! | [`reads_writes`] | `read.rs` and `write.rs`: plain reads and one-phase writes, scans, splits |
//! | [`percolator`] | `txn.rs`: prewrite, commit, rollback, lock resolution, pessimistic locks |
//! | [`atomic`] | `atomic.rs`: atomic commands on one region |
//! | [`gc`] | `gc.rs`: collecting versions below the safe point |
//! | [`etcd`] | `etcd/mod.rs`: etcd's key metadata kept by every write path, etcd range and txn |

mod atomic;
mod etcd;
mod gc;
mod percolator;
mod reads_writes;
mod storage_core;
mod test_pd;

use crate::{Storage, StorageConfig};
use atoll_engine::memory::MemoryEngine;
use atoll_pd_client::PdClient;
use atoll_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use atoll_proto::etcdserverpb::{
    request_op, Compare, DeleteRangeRequest as EtcdDeleteRange, PutRequest as EtcdPut,
    RangeRequest, RequestOp, TxnRequest,
};
use atoll_proto::kvrpcpb::*;
use atoll_proto::metapb;
use atoll_proto::mvccpb::KeyValue;
use atoll_proto::raft_cmdpb::{
    AdminCmdType, AdminRequest, RaftCmdRequest, RaftRequestHeader, TransferLeaderRequest,
};
use atoll_raftstore::snap::SnapManager;
use atoll_raftstore::{RaftStore, StoreDeps};
use atoll_test_cluster::{test_config, wait_until, MockPd, SimNetwork, SimTransport};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use test_pd::TestPd;

pub(crate) type S = Storage<MemoryEngine>;

struct Node {
    store: RaftStore<MemoryEngine>,
    engine: MemoryEngine,
    storage: Arc<S>,
    _snap_dir: tempfile::TempDir,
}

/// `count` stores sharing one region (id 1) that covers every key.
pub(crate) struct Cluster {
    pub rt: tokio::runtime::Runtime,
    pub pd: Arc<MockPd>,
    /// The PD the stores' [`Storage`] talk to (timestamps, safe point).
    pub tso: Arc<TestPd>,
    nodes: BTreeMap<u64, Node>,
    _net: Arc<SimNetwork<MemoryEngine>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in self.nodes.values() {
            n.store.shutdown();
        }
    }
}

impl Cluster {
    /// One store, default storage configuration, its region's leader ready.
    pub fn one() -> Cluster {
        Cluster::new(1, StorageConfig::default())
    }

    pub fn new(count: usize, cfg: StorageConfig) -> Cluster {
        atoll_util::logging::init("warn");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let pd = Arc::new(MockPd::new());
        let net = SimNetwork::new();
        let ids: Vec<u64> = (1..=count as u64).collect();
        let engines: Vec<MemoryEngine> = ids.iter().map(|_| MemoryEngine::new()).collect();
        let peer = |store_id: &u64| metapb::Peer {
            id: pd.alloc(),
            store_id: *store_id,
            role: 0,
        };
        let epoch = metapb::RegionEpoch {
            conf_ver: 1,
            version: 1,
        };
        let region = metapb::Region {
            id: 1,
            peers: ids.iter().map(peer).collect(),
            region_epoch: Some(epoch),
            ..Default::default()
        };
        for (id, e) in ids.iter().zip(&engines) {
            let ident = atoll_proto::raft_serverpb::StoreIdent {
                cluster_id: 1,
                store_id: *id,
            };
            atoll_raftstore::bootstrap::write_store_ident(e, &ident).expect("ident");
            atoll_raftstore::bootstrap::prepare_bootstrap_region(e, &region).expect("bootstrap");
            let store = metapb::Store {
                id: *id,
                address: format!("store{id}"),
                ..Default::default()
            };
            rt.block_on(pd.put_store(store)).expect("put store");
        }
        let first = metapb::Store {
            id: 1,
            ..Default::default()
        };
        rt.block_on(pd.bootstrap_cluster(first, region))
            .expect("bootstrap cluster");
        let tso = Arc::new(TestPd::new(pd.clone()));
        let mut nodes = BTreeMap::new();
        for (id, engine) in ids.into_iter().zip(engines) {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = RaftStore::start(StoreDeps {
                store_id: id.into(),
                cfg: test_config(),
                engine: engine.clone(),
                trans: Arc::new(SimTransport::new(net.clone())),
                pd: pd.clone(),
                snap_mgr: SnapManager::new(dir.path()).expect("snap dir"),
                runtime: rt.handle().clone(),
                stats: Arc::new(atoll_proto::pdpb::StoreStats::default),
            })
            .expect("start store");
            let router = store.router();
            net.add_router(id, router.clone());
            let storage = Arc::new(Storage::new(router, tso.clone(), cfg.clone()));
            let node = Node {
                store,
                engine,
                storage,
                _snap_dir: dir,
            };
            nodes.insert(id, node);
        }
        let c = Cluster {
            rt,
            pd,
            tso,
            nodes,
            _net: net,
        };
        c.leader_of(1);
        c
    }

    /// The store whose peer leads `region_id` and is ready to serve writes (waits for one).
    pub fn leader_of(&self, region_id: u64) -> u64 {
        let mut found = None;
        let ok = wait_until(Duration::from_secs(20), || {
            found = self.nodes.iter().find_map(|(id, n)| {
                let r = n.storage.router();
                let epoch = r.region(region_id.into())?.region_epoch;
                r.local_leader_snapshot(region_id.into(), epoch.as_ref())
                    .is_ok()
                    .then_some(*id)
            });
            found.is_some()
        });
        assert!(ok, "region {region_id} has no ready leader");
        found.unwrap()
    }

    /// Whether the peer of `region_id` on `store_id` leads it and is ready to serve.
    fn leads(&self, store_id: u64, region_id: u64) -> bool {
        let r = self.storage(store_id).router();
        r.region(region_id.into()).is_some_and(|x| {
            r.local_leader_snapshot(region_id.into(), x.region_epoch.as_ref())
                .is_ok()
        })
    }

    /// Hands the leadership of `region_id` to its peer on `to`; waits until that one serves.
    pub fn must_transfer_leader(&self, region_id: u64, to: u64) {
        let ok = wait_until(Duration::from_secs(20), || {
            if self.leads(to, region_id) {
                return true;
            }
            let from = self.leader_of(region_id);
            let region = self
                .storage(from)
                .router()
                .region(region_id.into())
                .unwrap();
            let target = region.peers.iter().find(|p| p.store_id == to).copied();
            let admin = AdminRequest {
                cmd_type: AdminCmdType::TransferLeader as i32,
                transfer_leader: Some(TransferLeaderRequest { peer: target }),
                ..Default::default()
            };
            let cmd = RaftCmdRequest {
                header: Some(RaftRequestHeader {
                    region_id,
                    peer: None,
                    region_epoch: region.region_epoch,
                    keys: vec![],
                }),
                requests: vec![],
                admin_request: Some(admin),
            };
            let proposed = self.storage(from).router().propose_async(cmd);
            let _ =
                self.run(async { tokio::time::timeout(Duration::from_secs(2), proposed).await });
            wait_until(Duration::from_millis(500), || self.leads(to, region_id))
        });
        assert!(ok, "store {to} never took the lead of region {region_id}");
    }

    /// The storage of a store.
    pub fn storage(&self, store_id: u64) -> &Arc<S> {
        &self.nodes[&store_id].storage
    }

    pub fn engine(&self, store_id: u64) -> &MemoryEngine {
        &self.nodes[&store_id].engine
    }

    /// The storage of the store leading the region of `key`.
    pub fn s(&self, key: &[u8]) -> &Arc<S> {
        let region = self.region(key);
        self.storage(self.leader_of(region.id))
    }

    /// The region holding `key`, as its leader knows it.
    pub fn region(&self, key: &[u8]) -> metapb::Region {
        let mut best: Option<metapb::Region> = None;
        for n in self.nodes.values() {
            if let Some((r, _)) = n.storage.router().region_for_key(key) {
                let v = |r: &metapb::Region| r.region_epoch.unwrap_or_default().version;
                if best.as_ref().is_none_or(|b| v(&r) > v(b)) {
                    best = Some(r);
                }
            }
        }
        best.unwrap_or_else(|| panic!("no store holds {key:?}"))
    }

    /// A request context for the region of `key`, addressed to its leader.
    pub fn ctx(&self, key: &[u8]) -> Option<Context> {
        let r = self.region(key);
        Some(ctx_on(&r, self.leader_of(r.id)))
    }

    /// A fresh timestamp from PD.
    pub fn ts(&self) -> u64 {
        self.run(self.tso.get_tso()).expect("tso")
    }

    pub fn run<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Runs a request on the storage of the leader of `key`'s region; it must be answered
    /// (not refused with a status).
    pub fn call<'a, F, R>(&'a self, key: &[u8], f: impl FnOnce(&'a S) -> F) -> R
    where
        F: Future<Output = Result<R, tonic::Status>>,
    {
        self.run(f(self.s(key))).expect("request refused")
    }

    /// A put sent to `store` with the context given.
    pub fn put_on(&self, store: u64, ctx: Context, key: &[u8], value: &[u8]) -> PutResponse {
        let req = PutRequest {
            context: Some(ctx),
            key: key.to_vec(),
            value: value.to_vec(),
            start_version: self.ts(),
        };
        self.run(self.storage(store).kv_put(req))
            .expect("put status")
    }

    /// A get sent to `store` with the context given.
    pub fn get_on(&self, store: u64, ctx: Context, key: &[u8], version: u64) -> GetResponse {
        let req = GetRequest {
            context: Some(ctx),
            key: key.to_vec(),
            version,
        };
        self.run(self.storage(store).kv_get(req))
            .expect("get status")
    }

    // ---------------- plain reads and writes ----------------

    pub fn put(&self, key: &[u8], value: &[u8], start_version: u64) -> PutResponse {
        let req = PutRequest {
            context: self.ctx(key),
            key: key.to_vec(),
            value: value.to_vec(),
            start_version,
        };
        self.call(key, |s| s.kv_put(req))
    }

    /// Puts with a fresh start timestamp; returns the commit timestamp.
    pub fn must_put(&self, key: &[u8], value: &[u8]) -> u64 {
        let resp = self.put(key, value, self.ts());
        must_ok(&resp.region_error, &resp.error);
        assert!(resp.commit_version > 0, "put {key:?}: {resp:?}");
        resp.commit_version
    }

    /// Deletes with a fresh start timestamp; returns the commit timestamp (0: nothing to do).
    pub fn must_delete(&self, key: &[u8]) -> u64 {
        let req = DeleteRequest {
            context: self.ctx(key),
            key: key.to_vec(),
            start_version: self.ts(),
        };
        let resp = self.call(key, |s| s.kv_delete(req));
        must_ok(&resp.region_error, &resp.error);
        resp.commit_version
    }

    pub fn get(&self, key: &[u8], version: u64) -> GetResponse {
        let req = GetRequest {
            context: self.ctx(key),
            key: key.to_vec(),
            version,
        };
        self.call(key, |s| s.kv_get(req))
    }

    /// The value of `key` at `version` (0 = latest).
    pub fn must_get(&self, key: &[u8], version: u64) -> Option<Vec<u8>> {
        let resp = self.get(key, version);
        must_ok(&resp.region_error, &resp.error);
        (!resp.not_found).then_some(resp.value)
    }

    pub fn scan(&self, req: ScanRequest) -> ScanResponse {
        let start = req.start_key.clone();
        let req = ScanRequest {
            context: req.context.or_else(|| self.ctx(&start)),
            ..req
        };
        self.call(&start, |s| s.kv_scan(req))
    }

    /// The keys a scan returns (asserting it succeeded).
    pub fn must_scan_keys(&self, req: ScanRequest) -> Vec<Vec<u8>> {
        let resp = self.scan(req);
        must_ok(&resp.region_error, &resp.error);
        resp.pairs.into_iter().map(|p| p.key).collect()
    }

    /// Splits the region of `at` at `at` through [`Storage::split_region`]; waits until both
    /// halves have a ready leader and returns them (left first).
    pub fn must_split(&self, at: &[u8]) -> Vec<metapb::Region> {
        let req = SplitRegionRequest {
            context: self.ctx(at),
            split_keys: vec![at.to_vec()],
        };
        let resp = self.call(at, |s| s.split_region(req));
        assert_eq!((resp.region_error, resp.error.as_str()), (None, ""));
        assert_eq!(resp.regions.len(), 2, "split at {at:?}: {:?}", resp.regions);
        for r in &resp.regions {
            self.leader_of(r.id);
        }
        resp.regions
    }

    // ---------------- transactions ----------------

    pub fn prewrite(&self, req: PrewriteRequest) -> PrewriteResponse {
        let first = req.mutations[0].key.clone();
        let req = PrewriteRequest {
            context: self.ctx(&first),
            ..req
        };
        self.call(&first, |s| s.kv_prewrite(req))
    }

    /// Prewrites puts of `kvs` (the first key is the primary) with a long TTL.
    /// Commits `old` to `key` in one phase, then leaves a lock on it of a new transaction
    /// (its primary: `key`) that starts after that commit; returns its start timestamp.
    pub fn must_lock_over(&self, key: &[u8], old: &[u8]) -> u64 {
        let commit = self.must_put(key, old);
        let mut start = self.ts();
        while start <= commit {
            start = self.ts();
        }
        self.must_prewrite(&[(key, b"locked")], start);
        start
    }

    pub fn must_prewrite(&self, kvs: &[(&[u8], &[u8])], start_ts: u64) {
        let resp = self.prewrite(prewrite_req(kvs, start_ts));
        assert!(
            resp.region_error.is_none() && resp.errors.is_empty(),
            "prewrite: {resp:?}"
        );
    }

    pub fn commit(&self, keys: &[&[u8]], start_ts: u64, commit_ts: u64) -> CommitResponse {
        let req = CommitRequest {
            context: self.ctx(keys[0]),
            start_version: start_ts,
            keys: keys.iter().map(|k| k.to_vec()).collect(),
            commit_version: commit_ts,
        };
        self.call(keys[0], |s| s.kv_commit(req))
    }

    pub fn must_commit(&self, keys: &[&[u8]], start_ts: u64, commit_ts: u64) {
        let resp = self.commit(keys, start_ts, commit_ts);
        must_ok(&resp.region_error, &resp.error);
        assert_eq!(resp.commit_version, commit_ts);
    }

    /// Prewrites and commits `kvs` in two phases; returns the commit timestamp.
    pub fn must_txn_put(&self, kvs: &[(&[u8], &[u8])]) -> u64 {
        let start = self.ts();
        self.must_prewrite(kvs, start);
        let commit = self.ts();
        let keys: Vec<&[u8]> = kvs.iter().map(|(k, _)| *k).collect();
        self.must_commit(&keys, start, commit);
        commit
    }

    pub fn rollback(&self, keys: &[&[u8]], start_ts: u64) -> BatchRollbackResponse {
        let req = BatchRollbackRequest {
            context: self.ctx(keys[0]),
            start_version: start_ts,
            keys: keys.iter().map(|k| k.to_vec()).collect(),
        };
        self.call(keys[0], |s| s.kv_batch_rollback(req))
    }

    /// The locks of the region of `start` at or below `max_version`.
    pub fn must_scan_locks(&self, start: &[u8], max_version: u64) -> Vec<LockInfo> {
        let req = ScanLockRequest {
            context: self.ctx(start),
            max_version,
            start_key: start.to_vec(),
            ..Default::default()
        };
        let resp = self.call(start, |s| s.kv_scan_lock(req));
        must_ok(&resp.region_error, &resp.error);
        resp.locks
    }

    // ---------------- etcd ----------------

    pub fn etcd_txn(&self, txn: TxnRequest, start_version: u64) -> EtcdTxnResponse {
        let key = first_key(&txn);
        let req = EtcdTxnRequest {
            context: self.ctx(&key),
            txn: Some(txn),
            start_version,
        };
        self.call(&key, |s| s.etcd_txn(req))
    }

    /// Runs an etcd txn that must be answered (succeeded or not); returns its answer.
    pub fn must_etcd_txn(&self, txn: TxnRequest) -> atoll_proto::etcdserverpb::TxnResponse {
        let resp = self.etcd_txn(txn, self.ts());
        must_ok(&resp.region_error, &resp.error);
        assert_eq!(resp.etcd_error, None);
        resp.txn.expect("txn answer")
    }

    /// The revision of an etcd put of `key`.
    pub fn must_etcd_put(&self, key: &[u8], value: &[u8]) -> i64 {
        let t = self.must_etcd_txn(etcd_txn(vec![], vec![put_op(key, value)]));
        t.header.expect("header").revision
    }

    /// etcd's view of the live keys of `[start, end)` now (empty end: the rest of the region).
    pub fn must_etcd_range(&self, start: &[u8], end: &[u8]) -> Vec<KeyValue> {
        let req = EtcdRangeRequest {
            context: self.ctx(start),
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            version: self.ts(),
            ..Default::default()
        };
        let resp = self.call(start, |s| s.etcd_range(req));
        must_ok(&resp.region_error, &resp.error);
        assert_eq!(resp.count, resp.kvs.len() as u64);
        resp.kvs
    }

    /// etcd's view of one key now.
    pub fn must_etcd_kv(&self, key: &[u8]) -> Option<KeyValue> {
        let mut end = key.to_vec();
        end.push(0);
        self.must_etcd_range(key, &end).pop()
    }
}

/// A context for region `r`, addressed to its peer on `store_id`.
pub(crate) fn ctx_on(r: &metapb::Region, store_id: u64) -> Context {
    Context {
        region_id: r.id,
        region_epoch: r.region_epoch,
        peer: r.peers.iter().find(|p| p.store_id == store_id).copied(),
        ..Default::default()
    }
}

/// Asserts a response carries neither a region error nor a key error.
pub(crate) fn must_ok(region: &Option<atoll_proto::errorpb::Error>, key: &Option<KeyError>) {
    assert_eq!(region, &None, "unexpected region error");
    assert_eq!(key, &None, "unexpected key error");
}

/// Asserts a request was refused as an invalid argument.
pub(crate) fn must_invalid<T: std::fmt::Debug>(r: Result<T, tonic::Status>) {
    assert_eq!(r.unwrap_err().code(), tonic::Code::InvalidArgument);
}

/// Asserts `e` is a lock of transaction `start_ts` with primary `primary`.
pub(crate) fn must_locked(e: &Option<KeyError>, start_ts: u64, primary: &[u8]) {
    let l = e
        .as_ref()
        .and_then(|e| e.locked.clone())
        .unwrap_or_else(|| panic!("expected a lock error, got {e:?}"));
    assert_eq!(
        (l.lock_version, l.primary_lock.as_slice()),
        (start_ts, primary)
    );
}

/// Asserts `e` is an `abort` key error whose message contains `what`.
pub(crate) fn must_abort(e: &Option<KeyError>, what: &str) {
    let msg = e.as_ref().map(|e| e.abort.clone()).unwrap_or_default();
    assert!(
        msg.contains(what),
        "expected abort with {what:?}, got {e:?}"
    );
}

pub(crate) fn mutation(op: Op, key: &[u8], value: &[u8]) -> Mutation {
    Mutation {
        op: op as i32,
        key: key.to_vec(),
        value: value.to_vec(),
        lease: 0,
    }
}

/// An optimistic prewrite of puts (the first key is the primary), TTL 10 s.
pub(crate) fn prewrite_req(kvs: &[(&[u8], &[u8])], start_ts: u64) -> PrewriteRequest {
    PrewriteRequest {
        mutations: kvs.iter().map(|(k, v)| mutation(Op::Put, k, v)).collect(),
        primary_lock: kvs[0].0.to_vec(),
        start_version: start_ts,
        lock_ttl: 10_000,
        txn_size: kvs.len() as u64,
        ..Default::default()
    }
}

// ---------------- etcd requests (shared with `etcd::eval`'s tests) ----------------

fn first_key(t: &TxnRequest) -> Vec<u8> {
    let from_op = |op: &RequestOp| match &op.request {
        Some(request_op::Request::RequestPut(p)) => Some(p.key.clone()),
        Some(request_op::Request::RequestDeleteRange(d)) => Some(d.key.clone()),
        Some(request_op::Request::RequestRange(r)) => Some(r.key.clone()),
        _ => None,
    };
    t.compare
        .first()
        .map(|c| c.key.clone())
        .or_else(|| t.success.iter().find_map(from_op))
        .or_else(|| t.failure.iter().find_map(from_op))
        .expect("a txn with a key")
}

pub(crate) fn etcd_txn(compare: Vec<Compare>, success: Vec<RequestOp>) -> TxnRequest {
    TxnRequest {
        compare,
        success,
        failure: vec![],
    }
}

/// etcd's put of `key`, asking for the previous key-value.
pub(crate) fn put_op(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(EtcdPut {
            key: key.as_ref().to_vec(),
            value: value.as_ref().to_vec(),
            prev_kv: true,
            ..Default::default()
        })),
    }
}

/// etcd's delete of `[key, end)` (empty end: the key alone), asking for the previous values.
pub(crate) fn del_op(key: impl AsRef<[u8]>, end: impl AsRef<[u8]>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(EtcdDeleteRange {
            prev_kv: true,
            key: key.as_ref().to_vec(),
            range_end: end.as_ref().to_vec(),
        })),
    }
}

/// etcd's range over `[key, end)` (empty end: the key alone).
pub(crate) fn range_op(key: impl AsRef<[u8]>, end: impl AsRef<[u8]>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key: key.as_ref().to_vec(),
            range_end: end.as_ref().to_vec(),
            ..Default::default()
        })),
    }
}

/// etcd's compare of one key.
pub(crate) fn cmp(
    key: impl AsRef<[u8]>,
    target: CompareTarget,
    result: CompareResult,
    u: TargetUnion,
) -> Compare {
    Compare {
        result: result as i32,
        target: target as i32,
        key: key.as_ref().to_vec(),
        range_end: vec![],
        target_union: Some(u),
    }
}
