//! Request semantics on one store: everything is MVCC (Percolator) data.
//!
//! - **Reads** at a timestamp raise `max_ts` first, wait out in-memory locks of one-phase
//!   writes in flight, then read a linearizable snapshot (ReadIndex on the leader). A read at
//!   version 0 reads the latest committed data.
//! - **Plain writes** (put, delete, compare-and-swap, delete-range) commit in one phase on the
//!   leader: under per-key latches and in-memory locks, with `commit_ts = max(start_ts,
//!   max_ts) + 1` (a fresh TSO if that would not exceed the key's newest version), so no read
//!   already served at a timestamp misses them and no later timestamp from PD is below them.
//!   A write carries a unique start timestamp; a retry of an applied write is recognised and
//!   answered without applying it twice.
//! - **Transaction commands** (prewrite, commit, ...) run the `atoll-txn` actions under latches
//!   on a leader snapshot and propose the resulting mutations through raft.
//! - A new leader fetches a fresh timestamp into `max_ts` before its first one-phase commit.
//! - **GC** drops versions below PD's safe point in bounded batches, leader by leader.

use crate::config::StorageConfig;
use atoll_engine::KvEngine;
use atoll_pd_client::PdClient;
use atoll_proto::kvrpcpb::*;
use atoll_proto::raft_cmdpb::{self, CmdType, RaftCmdRequest, RaftRequestHeader};
use atoll_proto::{errorpb, metapb};
use atoll_raftstore::{RaftRouter, RegionSnapshot};
use atoll_txn::{
    ConcurrencyManager, Latches, Modify, MvccReader, MvccTxn, TxnCommitRecord, TxnStatus,
};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Status;

/// Failpoint: before a plain write is proposed.
pub const FP_BEFORE_PLAIN_WRITE: &str = "storage::before_plain_write";
/// Failpoint: after a one-phase/plain write applied, before the answer is sent.
pub const FP_AFTER_WRITE_APPLIED: &str = "storage::after_write_applied";

const DELETE_RANGE_BATCH: usize = 1024;

type RespResult<T> = Result<T, Status>;

/// Why a command did not run: a region error for the client to act on, or a key error.
enum Fail {
    Region(Box<errorpb::Error>),
    Key(Box<KeyError>),
    /// Several keys failed (prewrite reports every lock it met).
    Keys(Vec<KeyError>),
}

impl Fail {
    fn region(e: atoll_raftstore::Error) -> Fail {
        Fail::Region(Box::new(e.into()))
    }
}

impl From<atoll_raftstore::Error> for Fail {
    fn from(e: atoll_raftstore::Error) -> Self {
        Fail::Region(Box::new(e.into()))
    }
}

impl From<atoll_txn::Error> for Fail {
    fn from(e: atoll_txn::Error) -> Self {
        Fail::Key(Box::new(e.to_key_error()))
    }
}

impl From<atoll_engine::Error> for Fail {
    fn from(e: atoll_engine::Error) -> Self {
        Fail::Key(Box::new(KeyError {
            abort: format!("engine: {e}"),
            ..Default::default()
        }))
    }
}

fn abort(msg: impl Into<String>) -> Fail {
    Fail::Key(Box::new(KeyError {
        abort: msg.into(),
        ..Default::default()
    }))
}

/// Fills a response's region error or key error from a failure.
macro_rules! fail_into {
    ($resp:expr, $f:expr, key) => {
        match $f {
            Fail::Region(e) => $resp.region_error = Some(*e),
            Fail::Key(e) => $resp.error = Some(*e),
            Fail::Keys(mut es) => $resp.error = es.drain(..).next(),
        }
    };
    ($resp:expr, $f:expr, keys) => {
        match $f {
            Fail::Region(e) => $resp.region_error = Some(*e),
            Fail::Key(e) => $resp.errors = vec![*e],
            Fail::Keys(es) => $resp.errors = es,
        }
    };
}

pub struct Permit<'a>(&'a AtomicUsize);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Storage<E: KvEngine> {
    router: RaftRouter<E>,
    pd: Arc<dyn PdClient>,
    cfg: StorageConfig,
    latches: Latches,
    cm: ConcurrencyManager,
    /// region id -> term for which max_ts was synced with PD.
    synced: Mutex<HashMap<u64, u64>>,
    inflight: AtomicUsize,
    safe_point: AtomicU64,
}

fn header(ctx: &Context) -> RaftRequestHeader {
    RaftRequestHeader {
        region_id: ctx.region_id,
        peer: ctx.peer,
        region_epoch: ctx.region_epoch,
        keys: vec![],
    }
}

fn key_not_in_region(key: &[u8], r: &metapb::Region) -> Fail {
    Fail::region(atoll_raftstore::Error::KeyNotInRegion {
        key: key.to_vec(),
        region_id: r.id,
        start_key: r.start_key.clone(),
        end_key: r.end_key.clone(),
    })
}

fn check_in_region(keys: &[&[u8]], r: &metapb::Region) -> Result<(), Fail> {
    for k in keys {
        if !atoll_keys::in_range(k, &r.start_key, &r.end_key) {
            return Err(key_not_in_region(k, r));
        }
    }
    Ok(())
}

fn to_requests(mods: Vec<Modify>) -> Vec<raft_cmdpb::Request> {
    mods.into_iter()
        .map(|m| match m {
            Modify::Put { cf, key, value } => raft_cmdpb::Request {
                cmd_type: CmdType::Put as i32,
                put: Some(raft_cmdpb::PutRequest {
                    cf: cf.to_string(),
                    key,
                    value,
                }),
                ..Default::default()
            },
            Modify::Delete { cf, key } => raft_cmdpb::Request {
                cmd_type: CmdType::Delete as i32,
                delete: Some(raft_cmdpb::DeleteRequest {
                    cf: cf.to_string(),
                    key,
                }),
                ..Default::default()
            },
        })
        .collect()
}

impl<E: KvEngine> Storage<E> {
    pub fn new(router: RaftRouter<E>, pd: Arc<dyn PdClient>, cfg: StorageConfig) -> Self {
        Storage {
            latches: Latches::new(cfg.latch_slots),
            cm: ConcurrencyManager::new(0),
            synced: Mutex::new(HashMap::new()),
            inflight: AtomicUsize::new(0),
            safe_point: AtomicU64::new(0),
            router,
            pd,
            cfg,
        }
    }

    pub fn max_ts(&self) -> u64 {
        self.cm.max_ts()
    }

    pub fn router(&self) -> &RaftRouter<E> {
        &self.router
    }

    /// Admission control: `None` when too many requests are in flight.
    pub fn admit(&self) -> Option<Permit<'_>> {
        let n = self.inflight.fetch_add(1, Ordering::Relaxed);
        let p = Permit(&self.inflight);
        if n >= self.cfg.max_inflight_requests {
            return None;
        }
        Some(p)
    }

    // ---------------- validation ----------------

    fn check_key(&self, key: &[u8]) -> RespResult<()> {
        if key.is_empty() {
            return Err(Status::invalid_argument("key must not be empty"));
        }
        if key.len() as u64 > self.cfg.max_key_size.0 {
            return Err(Status::invalid_argument(format!(
                "key of {} bytes exceeds the limit of {} bytes",
                key.len(),
                self.cfg.max_key_size.0
            )));
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> RespResult<()> {
        if value.len() as u64 > self.cfg.max_value_size.0 {
            return Err(Status::invalid_argument(format!(
                "value of {} bytes exceeds the limit of {} bytes",
                value.len(),
                self.cfg.max_value_size.0
            )));
        }
        Ok(())
    }

    fn check_ctx(&self, ctx: &Option<Context>) -> RespResult<Context> {
        let ctx = ctx
            .clone()
            .ok_or_else(|| Status::invalid_argument("request without context"))?;
        if ctx.region_id == 0 {
            return Err(Status::invalid_argument("context without a region id"));
        }
        Ok(ctx)
    }

    fn check_store(&self, ctx: &Context) -> Result<(), Fail> {
        if let Some(p) = &ctx.peer {
            if p.store_id != 0 && p.store_id != self.router.store_id() {
                return Err(Fail::region(atoll_raftstore::Error::StoreNotMatch {
                    request_store_id: p.store_id,
                    actual_store_id: self.router.store_id(),
                }));
            }
        }
        Ok(())
    }

    // ---------------- snapshots ----------------

    /// A linearizable snapshot for reading at `ts` (0 = latest). `keys`/`range` are what the
    /// read touches (for in-memory lock checks).
    async fn read_snapshot(
        &self,
        ctx: &Context,
        ts: u64,
        point: Option<&[u8]>,
        range: Option<(&[u8], &[u8])>,
    ) -> Result<RegionSnapshot<E::Snapshot>, Fail> {
        self.check_store(ctx)?;
        if ts != 0 && ts != u64::MAX {
            let sp = self.safe_point.load(Ordering::Relaxed);
            if ts < sp {
                return Err(abort(format!(
                    "snapshot too old: read at {ts} is below the GC safe point {sp}"
                )));
            }
            // Raise max_ts first, then wait out one-phase writes that could land below ts.
            self.cm.update_max_ts(ts);
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                let blocked = match (point, range) {
                    (Some(k), _) => self.cm.check_key(k, ts).is_some(),
                    (None, Some((s, e))) => self.cm.check_range(s, e, ts).is_some(),
                    _ => false,
                };
                if !blocked {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(Fail::region(atoll_raftstore::Error::ServerIsBusy(
                        "writes in flight on the keys read".into(),
                    )));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        if ctx.unsafe_local_read {
            if !self.cfg.allow_unsafe_local_read {
                return Err(abort("unsafe_local_read is disabled on this store"));
            }
            // Deliberately unsafe (test-only): whatever this peer has applied, leader or not.
            let region = self.router.region(ctx.region_id).ok_or(Fail::region(
                atoll_raftstore::Error::RegionNotFound(ctx.region_id),
            ))?;
            return Ok(RegionSnapshot {
                snap: self.router.engine().snapshot(),
                region: Arc::new(region),
                applied_index: 0,
                term: 0,
            });
        }
        Ok(self.router.read_async(header(ctx)).await?)
    }

    /// A leader snapshot for a write command (its keys are latched by the caller). Its state
    /// may be stale if this leader was deposed without knowing it yet: only a decision that
    /// goes through the log may rest on it alone (see [`Self::decide_on_leader`]).
    fn write_snapshot(&self, ctx: &Context) -> Result<RegionSnapshot<E::Snapshot>, Fail> {
        self.check_store(ctx)?;
        Ok(self
            .router
            .local_leader_snapshot(ctx.region_id, ctx.region_epoch.as_ref())?)
    }

    /// A leader snapshot that is as fresh as a linearizable read: served under the leader
    /// lease, or after a ReadIndex round (which a deposed leader cannot complete).
    async fn confirmed_snapshot(&self, ctx: &Context) -> Result<RegionSnapshot<E::Snapshot>, Fail> {
        self.check_store(ctx)?;
        Ok(self.router.read_async(header(ctx)).await?)
    }

    /// Decides a write command on the leader's state (the caller holds the latches of `keys`).
    /// `decide` returns its outcome and whether that outcome writes anything.
    ///
    /// An outcome that writes is proposed through raft, so the leader's local snapshot is
    /// enough: a deposed leader's proposal never commits, and a live leader's latches order it
    /// after every earlier write to the keys. An outcome that writes nothing (a failed compare,
    /// a delete of nothing, a retry found already done, a key error) is answered from this
    /// store's state alone; a leader cut off from its peers may not know yet that another was
    /// elected and wrote since. So such an outcome stands only once leadership is confirmed
    /// after it was decided, by the lease or a ReadIndex round (which a deposed leader cannot
    /// complete), in the same term: a term has one leader, every earlier term's entries were
    /// applied before this leader served, and its own writes to these keys are held off by the
    /// latches, so the decision is still current. If the term changed meanwhile, the command
    /// is decided again on the confirmed snapshot (and proposes its writes if it now has
    /// some). Region errors need no confirmation: the client retries elsewhere.
    async fn decide_on_leader<T>(
        &self,
        ctx: &Context,
        keys: &[Vec<u8>],
        mut decide: impl FnMut(&RegionSnapshot<E::Snapshot>) -> Result<(T, bool), Fail>,
    ) -> Result<(RegionSnapshot<E::Snapshot>, T), Fail> {
        let krefs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        let snap = self.write_snapshot(ctx)?;
        check_in_region(&krefs, &snap.region)?;
        let first = decide(&snap);
        match first {
            Ok((out, true)) => return Ok((snap, out)),
            Err(Fail::Region(e)) => return Err(Fail::Region(e)),
            Ok((_, false)) | Err(_) => {}
        }
        let confirmed = self.confirmed_snapshot(ctx).await?;
        if confirmed.term == snap.term {
            return first.map(|(out, _)| (snap, out));
        }
        check_in_region(&krefs, &confirmed.region)?;
        let (out, _) = decide(&confirmed)?;
        Ok((confirmed, out))
    }

    async fn propose(
        &self,
        ctx: &Context,
        region: &metapb::Region,
        mods: Vec<Modify>,
    ) -> Result<(), Fail> {
        if mods.is_empty() {
            return Ok(());
        }
        let cmd = RaftCmdRequest {
            header: Some(RaftRequestHeader {
                region_id: region.id,
                peer: ctx.peer,
                region_epoch: region.region_epoch,
                keys: vec![],
            }),
            requests: to_requests(mods),
            admin_request: None,
        };
        self.router.propose_async(cmd).await?;
        Ok(())
    }

    /// A new leader has not seen the reads its predecessors served: learn a timestamp above
    /// all of them before choosing commit timestamps.
    async fn ensure_max_ts_synced(&self, region_id: u64, term: u64) -> Result<(), Fail> {
        if self.synced.lock().get(&region_id) == Some(&term) {
            return Ok(());
        }
        let ts = self.pd.get_tso().await.map_err(|e| {
            Fail::Region(Box::new(errorpb::Error {
                message: format!("cannot sync max_ts with PD: {e}"),
                max_timestamp_not_synced: Some(errorpb::MaxTimestampNotSynced {}),
                ..Default::default()
            }))
        })?;
        self.cm.update_max_ts(ts);
        self.synced.lock().insert(region_id, term);
        Ok(())
    }

    /// A commit timestamp above max_ts, start_ts and `newest` (the keys' newest versions),
    /// never above what PD hands out next.
    async fn one_pc_commit_ts(&self, start_ts: u64, newest: u64) -> Result<u64, Fail> {
        let mut ts = self.cm.max_ts().max(start_ts) + 1;
        while ts <= newest {
            let fresh = self
                .pd
                .get_tso()
                .await
                .map_err(|e| abort(format!("TSO: {e}")))?;
            ts = ts.max(fresh);
        }
        Ok(ts)
    }

    // ---------------- plain reads ----------------

    pub async fn kv_get(&self, req: GetRequest) -> RespResult<GetResponse> {
        let ctx = self.check_ctx(&req.context)?;
        self.check_key(&req.key)?;
        let mut resp = GetResponse::default();
        let r: Result<Option<Vec<u8>>, Fail> = async {
            let snap = self
                .read_snapshot(&ctx, req.version, Some(&req.key), None)
                .await?;
            check_in_region(&[&req.key], &snap.region)?;
            let ts = if req.version == 0 {
                u64::MAX
            } else {
                req.version
            };
            Ok(MvccReader::new(snap.snap).get(&req.key, ts, &ctx.resolved_locks)?)
        }
        .await;
        match r {
            Ok(Some(v)) => resp.value = v,
            Ok(None) => resp.not_found = true,
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    pub async fn kv_batch_get(&self, req: BatchGetRequest) -> RespResult<BatchGetResponse> {
        let ctx = self.check_ctx(&req.context)?;
        for k in &req.keys {
            self.check_key(k)?;
        }
        let mut resp = BatchGetResponse::default();
        let r: Result<Vec<KvPair>, Fail> = async {
            let (lo, hi) = match (req.keys.iter().min(), req.keys.iter().max()) {
                (Some(a), Some(b)) => (a.clone(), {
                    let mut e = b.clone();
                    e.push(0);
                    e
                }),
                _ => return Ok(vec![]),
            };
            let snap = self
                .read_snapshot(&ctx, req.version, None, Some((&lo, &hi)))
                .await?;
            let keys: Vec<&[u8]> = req.keys.iter().map(|k| k.as_slice()).collect();
            check_in_region(&keys, &snap.region)?;
            let ts = if req.version == 0 {
                u64::MAX
            } else {
                req.version
            };
            let reader = MvccReader::new(snap.snap);
            let mut out = vec![];
            for k in &req.keys {
                if let Some(v) = reader.get(k, ts, &ctx.resolved_locks)? {
                    out.push(KvPair {
                        key: k.clone(),
                        value: v,
                    });
                }
            }
            Ok(out)
        }
        .await;
        match r {
            Ok(p) => resp.pairs = p,
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    pub async fn kv_scan(&self, req: ScanRequest) -> RespResult<ScanResponse> {
        let ctx = self.check_ctx(&req.context)?;
        if !req.end_key.is_empty() && req.start_key > req.end_key {
            return Err(Status::invalid_argument("scan start is after its end"));
        }
        let mut resp = ScanResponse::default();
        let r: Result<Vec<KvPair>, Fail> = async {
            let snap = self
                .read_snapshot(
                    &ctx,
                    req.version,
                    None,
                    Some((&req.start_key, &req.end_key)),
                )
                .await?;
            let region = &snap.region;
            // Clip to the region; a range starting outside it was routed with a stale view.
            if !atoll_keys::in_range(&req.start_key, &region.start_key, &region.end_key)
                && req.start_key != region.start_key
                && !(req.reverse && req.start_key < region.start_key)
            {
                return Err(key_not_in_region(&req.start_key, region));
            }
            let start = if req.start_key.as_slice() < region.start_key.as_slice() {
                region.start_key.clone()
            } else {
                req.start_key.clone()
            };
            let end = match (req.end_key.is_empty(), region.end_key.is_empty()) {
                (true, _) => region.end_key.clone(),
                (false, true) => req.end_key.clone(),
                (false, false) => std::cmp::min(req.end_key.clone(), region.end_key.clone()),
            };
            if req.reverse
                && !req.end_key.is_empty()
                && !region.end_key.is_empty()
                && req.end_key > region.end_key
            {
                return Err(key_not_in_region(&req.end_key, region));
            }
            let ts = if req.version == 0 {
                u64::MAX
            } else {
                req.version
            };
            let kvs = MvccReader::new(snap.snap).scan(
                &start,
                &end,
                req.limit as usize,
                ts,
                req.key_only,
                req.reverse,
                &ctx.resolved_locks,
            )?;
            Ok(kvs
                .into_iter()
                .map(|(key, value)| KvPair { key, value })
                .collect())
        }
        .await;
        match r {
            Ok(p) => resp.pairs = p,
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    // ---------------- plain writes ----------------

    /// The shared one-phase path of plain writes. `decide` sees the reader and returns the
    /// writes to make (none, e.g. for a failed compare) plus an answer payload; it may run twice
    /// (see [`Self::decide_on_leader`]).
    async fn plain<T, D>(
        &self,
        ctx: &Context,
        start_ts: u64,
        keys: Vec<Vec<u8>>,
        mut decide: D,
    ) -> Result<(u64, T), Fail>
    where
        D: FnMut(&MvccReader<E::Snapshot>) -> Result<(Vec<(Vec<u8>, Option<Vec<u8>>)>, T), Fail>,
        T: Default,
    {
        if start_ts == 0 {
            return Err(abort(
                "plain writes need a start_version (a unique timestamp)",
            ));
        }
        let mut keys = keys;
        keys.sort();
        keys.dedup();
        let _latch = self.latches.acquire(&keys).await;
        let mem = self.cm.lock_keys(&keys);
        let (snap, (writes, answer, done)) = self
            .decide_on_leader(ctx, &keys, |snap| {
                let reader = MvccReader::new(snap.snap.clone());
                // A retry of a write already applied: answer it again.
                for k in &keys {
                    if let TxnCommitRecord::SingleRecord { commit_ts, write } =
                        reader.get_txn_commit_record(k, start_ts)?
                    {
                        if write.write_type != atoll_txn::WriteType::Rollback {
                            return Ok(((vec![], T::default(), Some(commit_ts)), false));
                        }
                    }
                }
                let (writes, answer) = decide(&reader)?;
                let writes_some = !writes.is_empty();
                Ok(((writes, answer, None), writes_some))
            })
            .await?;
        if let Some(commit_ts) = done {
            return Ok((commit_ts, answer));
        }
        if writes.is_empty() {
            return Ok((0, answer));
        }
        self.ensure_max_ts_synced(snap.region.id, snap.term).await?;
        let reader = MvccReader::new(snap.snap.clone());
        let mut newest = 0;
        for (k, _) in &writes {
            newest = newest.max(reader.latest_commit_ts(k)?.unwrap_or(0));
        }
        let commit_ts = self.one_pc_commit_ts(start_ts, newest).await?;
        mem.set_commit_ts(commit_ts);
        let mut txn = MvccTxn::new(start_ts);
        for (k, v) in writes {
            atoll_txn::plain_write(&mut txn, &reader, &k, v, commit_ts)?;
        }
        fail::fail_point!(FP_BEFORE_PLAIN_WRITE, |_| Err(abort(
            "failpoint: plain write refused"
        )));
        self.propose(ctx, &snap.region, txn.into_modifies()).await?;
        fail::fail_point!(FP_AFTER_WRITE_APPLIED, |_| Err(Fail::region(
            atoll_raftstore::Error::StaleCommand
        )));
        Ok((commit_ts, answer))
    }

    pub async fn kv_put(&self, req: PutRequest) -> RespResult<PutResponse> {
        let ctx = self.check_ctx(&req.context)?;
        self.check_key(&req.key)?;
        self.check_value(&req.value)?;
        let mut resp = PutResponse::default();
        // A put always writes: decided once.
        let mut w = Some(vec![(req.key.clone(), Some(req.value))]);
        match self
            .plain(&ctx, req.start_version, vec![req.key], move |_| {
                Ok((w.take().unwrap_or_default(), ()))
            })
            .await
        {
            Ok((ts, ())) => resp.commit_version = ts,
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    pub async fn kv_batch_put(&self, req: BatchPutRequest) -> RespResult<BatchPutResponse> {
        let ctx = self.check_ctx(&req.context)?;
        let mut size = 0u64;
        for p in &req.pairs {
            self.check_key(&p.key)?;
            self.check_value(&p.value)?;
            size += (p.key.len() + p.value.len()) as u64;
        }
        if size > self.cfg.max_batch_size.0 {
            return Err(Status::invalid_argument(format!(
                "batch of {size} bytes exceeds {} bytes",
                self.cfg.max_batch_size.0
            )));
        }
        let mut resp = BatchPutResponse::default();
        let keys: Vec<Vec<u8>> = req.pairs.iter().map(|p| p.key.clone()).collect();
        let mut last: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        for p in req.pairs {
            last.insert(p.key, p.value);
        }
        let mut w = Some(
            last.into_iter()
                .map(|(k, v)| (k, Some(v)))
                .collect::<Vec<_>>(),
        );
        match self
            .plain(&ctx, req.start_version, keys, move |_| {
                Ok((w.take().unwrap_or_default(), ()))
            })
            .await
        {
            Ok((ts, ())) => resp.commit_version = ts,
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    pub async fn kv_delete(&self, req: DeleteRequest) -> RespResult<DeleteResponse> {
        let ctx = self.check_ctx(&req.context)?;
        self.check_key(&req.key)?;
        let mut resp = DeleteResponse::default();
        let key = req.key.clone();
        let r = self
            .plain(&ctx, req.start_version, vec![req.key], move |reader| {
                // Deleting nothing writes nothing.
                let live = reader.get(&key, u64::MAX, &[])?.is_some();
                Ok((
                    if live {
                        vec![(key.clone(), None)]
                    } else {
                        vec![]
                    },
                    (),
                ))
            })
            .await;
        match r {
            Ok((ts, ())) => resp.commit_version = ts,
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    pub async fn kv_delete_range(
        &self,
        req: DeleteRangeRequest,
    ) -> RespResult<DeleteRangeResponse> {
        let ctx = self.check_ctx(&req.context)?;
        if !req.end_key.is_empty() && req.start_key > req.end_key {
            return Err(Status::invalid_argument(
                "delete range start is after its end",
            ));
        }
        let mut resp = DeleteRangeResponse::default();
        let limit = if req.limit == 0 {
            DELETE_RANGE_BATCH
        } else {
            (req.limit as usize).min(DELETE_RANGE_BATCH)
        };
        let r: Result<(u32, bool), Fail> = async {
            // Find the live keys (latest), then delete them in one phase. Finding none is an
            // answer that writes nothing: confirmed like any other (see `decide_on_leader`).
            let start = std::slice::from_ref(&req.start_key);
            let (_, keys) = self
                .decide_on_leader(&ctx, start, |snap| {
                    let end = if req.end_key.is_empty()
                        || (!snap.region.end_key.is_empty() && req.end_key > snap.region.end_key)
                    {
                        snap.region.end_key.clone()
                    } else {
                        req.end_key.clone()
                    };
                    let found = MvccReader::new(snap.snap.clone()).scan(
                        &req.start_key,
                        &end,
                        limit,
                        u64::MAX,
                        true,
                        false,
                        &[],
                    )?;
                    let keys: Vec<Vec<u8>> = found.into_iter().map(|(k, _)| k).collect();
                    let some = !keys.is_empty();
                    Ok((keys, some))
                })
                .await?;
            if keys.is_empty() {
                return Ok((0, false));
            }
            let more = keys.len() >= limit;
            let ks = keys.clone();
            let (_, n) = self
                .plain(&ctx, req.start_version, keys, move |reader| {
                    let mut w = vec![];
                    for k in ks.iter().cloned() {
                        if reader.get(&k, u64::MAX, &[])?.is_some() {
                            w.push((k, None));
                        }
                    }
                    let n = w.len() as u32;
                    Ok((w, n))
                })
                .await?;
            Ok((n, more))
        }
        .await;
        match r {
            Ok((n, more)) => {
                resp.deleted = n;
                resp.more = more;
            }
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    pub async fn kv_compare_and_swap(
        &self,
        req: CompareAndSwapRequest,
    ) -> RespResult<CompareAndSwapResponse> {
        let ctx = self.check_ctx(&req.context)?;
        self.check_key(&req.key)?;
        if !req.delete {
            self.check_value(&req.value)?;
        }
        let mut resp = CompareAndSwapResponse::default();
        let key = req.key.clone();
        let (expected, expect_absent, value, delete) = (
            req.expected.clone(),
            req.expect_absent,
            req.value.clone(),
            req.delete,
        );
        let r = self
            .plain(
                &ctx,
                req.start_version,
                vec![req.key.clone()],
                move |reader| {
                    let cur = reader.get(&key, u64::MAX, &[])?;
                    let matches = match &cur {
                        None => expect_absent,
                        Some(v) => !expect_absent && *v == expected,
                    };
                    let w = if matches {
                        vec![(key.clone(), if delete { None } else { Some(value.clone()) })]
                    } else {
                        vec![]
                    };
                    // (swapped, previous value)
                    Ok((w, Some((matches, cur))))
                },
            )
            .await;
        match r {
            Ok((ts, Some((ok, prev)))) => {
                resp.succeeded = ok;
                resp.commit_version = ts;
                resp.previous_not_found = prev.is_none();
                resp.previous_value = prev.unwrap_or_default();
            }
            // A retry of a swap that already happened.
            Ok((ts, None)) => {
                resp.succeeded = true;
                resp.commit_version = ts;
                resp.previous_not_found = req.expect_absent;
                resp.previous_value = if req.expect_absent {
                    vec![]
                } else {
                    req.expected
                };
            }
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    // ---------------- transactions ----------------

    /// Runs a transaction command on `keys` (latched) and proposes its mutations. `f` may run
    /// twice (see [`Self::decide_on_leader`]).
    async fn txn_cmd<T, F>(
        &self,
        ctx: &Context,
        keys: &[Vec<u8>],
        start_ts: u64,
        f: F,
    ) -> Result<T, Fail>
    where
        F: Fn(&mut MvccTxn, &MvccReader<E::Snapshot>, &metapb::Region) -> Result<T, Fail>,
    {
        let mut ks = keys.to_vec();
        ks.sort();
        ks.dedup();
        let _latch = self.latches.acquire(&ks).await;
        let (snap, (out, mods)) = self
            .decide_on_leader(ctx, &ks, |snap| {
                let reader = MvccReader::new(snap.snap.clone());
                let mut txn = MvccTxn::new(start_ts);
                let out = f(&mut txn, &reader, &snap.region)?;
                let mods = txn.into_modifies();
                let writes = !mods.is_empty();
                Ok(((out, mods), writes))
            })
            .await?;
        self.propose(ctx, &snap.region, mods).await?;
        Ok(out)
    }

    pub async fn kv_prewrite(&self, req: PrewriteRequest) -> RespResult<PrewriteResponse> {
        let ctx = self.check_ctx(&req.context)?;
        if req.mutations.is_empty() || req.start_version == 0 || req.primary_lock.is_empty() {
            return Err(Status::invalid_argument(
                "prewrite needs mutations, a start version and a primary",
            ));
        }
        let mut size = 0u64;
        for m in &req.mutations {
            self.check_key(&m.key)?;
            self.check_value(&m.value)?;
            size += (m.key.len() + m.value.len()) as u64;
        }
        if size > self.cfg.max_batch_size.0 {
            return Err(Status::invalid_argument(format!(
                "prewrite of {size} bytes exceeds {} bytes",
                self.cfg.max_batch_size.0
            )));
        }
        let mut resp = PrewriteResponse::default();
        let keys: Vec<Vec<u8>> = req.mutations.iter().map(|m| m.key.clone()).collect();
        let one_pc = req.try_one_pc;
        let r: Result<u64, Fail> = async {
            let mut ks = keys.clone();
            ks.sort();
            ks.dedup();
            let _latch = self.latches.acquire(&ks).await;
            let mem = if one_pc {
                Some(self.cm.lock_keys(&ks))
            } else {
                None
            };
            let params = atoll_txn::PrewriteParams {
                primary: req.primary_lock.clone(),
                start_ts: req.start_version,
                lock_ttl: req.lock_ttl,
                txn_size: req.txn_size,
                for_update_ts: req.for_update_ts,
                use_async_commit: false,
                secondaries: vec![],
                min_commit_ts: 0,
                max_commit_ts: req.max_commit_ts,
                one_pc,
            };
            // Ok(Err(commit_ts)): a retry of a one-phase prewrite that already committed.
            let (snap, prewritten) = self
                .decide_on_leader(&ctx, &ks, |snap| {
                    let reader = MvccReader::new(snap.snap.clone());
                    let mut txn = MvccTxn::new(req.start_version);
                    let mut errors = vec![];
                    for (i, m) in req.mutations.iter().enumerate() {
                        let op = Op::try_from(m.op)
                            .map_err(|_| abort(format!("unknown op {}", m.op)))?;
                        let pess = req.is_pessimistic_lock.get(i).copied().unwrap_or(false);
                        let mutation = (op, m.key.as_slice(), m.value.as_slice());
                        match atoll_txn::prewrite(&mut txn, &reader, &params, mutation, pess) {
                            Ok(_) => {}
                            Err(atoll_txn::Error::Committed { commit_ts, .. }) if one_pc => {
                                return Ok((Err(commit_ts), false))
                            }
                            Err(atoll_txn::Error::Committed { .. }) => {}
                            Err(e) => errors.push(e.to_key_error()),
                        }
                    }
                    if !errors.is_empty() {
                        // Every problem is reported at once (the client resolves all the
                        // locks); nothing of this prewrite is written.
                        return Err(Fail::Keys(errors));
                    }
                    let writes = !txn.is_empty();
                    Ok((Ok(txn), writes))
                })
                .await?;
            let mut txn = match prewritten {
                Ok(txn) => txn,
                Err(commit_ts) => return Ok(commit_ts),
            };
            if one_pc {
                self.ensure_max_ts_synced(snap.region.id, snap.term).await?;
            }
            let reader = MvccReader::new(snap.snap.clone());
            let mut commit_ts = 0;
            if one_pc {
                let mut newest = 0;
                for k in &ks {
                    newest = newest.max(reader.latest_commit_ts(k)?.unwrap_or(0));
                }
                commit_ts = self.one_pc_commit_ts(req.start_version, newest).await?;
                if req.max_commit_ts != 0 && commit_ts > req.max_commit_ts {
                    // Fall back to two phases: write the locks instead.
                    return Err(abort("one-phase commit timestamp above max_commit_ts"));
                }
                if let Some(m) = &mem {
                    m.set_commit_ts(commit_ts);
                }
                txn.commit_one_pc(commit_ts)?;
            }
            self.propose(&ctx, &snap.region, txn.into_modifies())
                .await?;
            Ok(commit_ts)
        }
        .await;
        match r {
            Ok(ts) => resp.one_pc_commit_ts = ts,
            Err(f) => fail_into!(resp, f, keys),
        }
        Ok(resp)
    }

    pub async fn kv_commit(&self, req: CommitRequest) -> RespResult<CommitResponse> {
        let ctx = self.check_ctx(&req.context)?;
        if req.commit_version <= req.start_version {
            return Err(Status::invalid_argument(
                "commit version must exceed start version",
            ));
        }
        let mut resp = CommitResponse::default();
        let keys = req.keys.clone();
        let r = self
            .txn_cmd(&ctx, &req.keys, req.start_version, |txn, reader, _| {
                for k in &keys {
                    atoll_txn::commit(txn, reader, k, req.commit_version)?;
                }
                Ok(())
            })
            .await;
        match r {
            Ok(()) => resp.commit_version = req.commit_version,
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    pub async fn kv_batch_rollback(
        &self,
        req: BatchRollbackRequest,
    ) -> RespResult<BatchRollbackResponse> {
        let ctx = self.check_ctx(&req.context)?;
        let mut resp = BatchRollbackResponse::default();
        let keys = req.keys.clone();
        let r = self
            .txn_cmd(&ctx, &req.keys, req.start_version, |txn, reader, _| {
                // A later one-phase commit must not pick this start_ts as its commit_ts.
                self.cm.update_max_ts(req.start_version);
                for k in &keys {
                    atoll_txn::rollback(txn, reader, k, false)?;
                }
                Ok(())
            })
            .await;
        if let Err(f) = r {
            fail_into!(resp, f, key);
        }
        Ok(resp)
    }

    pub async fn kv_check_txn_status(
        &self,
        req: CheckTxnStatusRequest,
    ) -> RespResult<CheckTxnStatusResponse> {
        let ctx = self.check_ctx(&req.context)?;
        let mut resp = CheckTxnStatusResponse::default();
        if req.caller_start_ts != 0 && req.caller_start_ts != u64::MAX {
            self.cm.update_max_ts(req.caller_start_ts);
        }
        let primary = req.primary_key.clone();
        let r = self
            .txn_cmd(
                &ctx,
                std::slice::from_ref(&req.primary_key),
                req.lock_ts,
                |txn, reader, _| {
                    self.cm.update_max_ts(req.lock_ts);
                    Ok(atoll_txn::check_txn_status(
                        txn,
                        reader,
                        &primary,
                        req.lock_ts,
                        req.caller_start_ts,
                        req.current_ts,
                        req.rollback_if_not_exist,
                    )?)
                },
            )
            .await;
        match r {
            Ok(s) => {
                resp.action = s.action() as i32;
                match s {
                    TxnStatus::Locked { ttl, lock_info, .. } => {
                        resp.lock_ttl = ttl.max(1);
                        resp.lock_info = Some(lock_info);
                    }
                    TxnStatus::Committed { commit_ts } => resp.commit_version = commit_ts,
                    TxnStatus::RolledBack
                    | TxnStatus::TtlExpire
                    | TxnStatus::LockNotExistRollback => {}
                }
            }
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    pub async fn kv_check_secondary_locks(
        &self,
        req: CheckSecondaryLocksRequest,
    ) -> RespResult<CheckSecondaryLocksResponse> {
        let ctx = self.check_ctx(&req.context)?;
        let mut resp = CheckSecondaryLocksResponse::default();
        let keys = req.keys.clone();
        let r = self
            .txn_cmd(&ctx, &req.keys, req.start_version, |txn, reader, _| {
                self.cm.update_max_ts(req.start_version);
                Ok(atoll_txn::check_secondary_locks(
                    txn,
                    reader,
                    &keys,
                    req.start_version,
                )?)
            })
            .await;
        match r {
            Ok(atoll_txn::SecondaryLocksStatus::Locked(l)) => resp.locks = l,
            Ok(atoll_txn::SecondaryLocksStatus::Committed(ts)) => resp.commit_ts = ts,
            Ok(atoll_txn::SecondaryLocksStatus::RolledBack) => {}
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    pub async fn kv_resolve_lock(
        &self,
        req: ResolveLockRequest,
    ) -> RespResult<ResolveLockResponse> {
        let ctx = self.check_ctx(&req.context)?;
        let mut resp = ResolveLockResponse::default();
        let keys = if req.keys.is_empty() {
            // Every lock of the transaction in this region ("none" is confirmed like any
            // answer that writes nothing).
            let found = self
                .decide_on_leader(&ctx, &[], |snap| {
                    let r = &snap.region;
                    let locks = MvccReader::new(snap.snap.clone()).scan_locks(
                        &r.start_key,
                        &r.end_key,
                        u64::MAX,
                        0,
                    )?;
                    let keys: Vec<Vec<u8>> = locks
                        .into_iter()
                        .filter(|(_, l)| l.start_ts == req.start_version)
                        .map(|(k, _)| k)
                        .collect();
                    let some = !keys.is_empty();
                    Ok((keys, some))
                })
                .await;
            match found {
                Ok((_, keys)) => keys,
                Err(f) => {
                    fail_into!(resp, f, key);
                    return Ok(resp);
                }
            }
        } else {
            req.keys.clone()
        };
        if keys.is_empty() {
            return Ok(resp);
        }
        let ks = keys.clone();
        let r = self
            .txn_cmd(&ctx, &keys, req.start_version, |txn, reader, _| {
                if req.commit_version == 0 {
                    self.cm.update_max_ts(req.start_version);
                }
                for k in &ks {
                    atoll_txn::resolve_lock(txn, reader, k, req.start_version, req.commit_version)?;
                }
                Ok(())
            })
            .await;
        if let Err(f) = r {
            fail_into!(resp, f, key);
        }
        Ok(resp)
    }

    pub async fn kv_txn_heart_beat(
        &self,
        req: TxnHeartBeatRequest,
    ) -> RespResult<TxnHeartBeatResponse> {
        let ctx = self.check_ctx(&req.context)?;
        let mut resp = TxnHeartBeatResponse::default();
        let primary = req.primary_lock.clone();
        let r = self
            .txn_cmd(
                &ctx,
                std::slice::from_ref(&req.primary_lock),
                req.start_version,
                |txn, reader, _| {
                    Ok(atoll_txn::txn_heart_beat(
                        txn,
                        reader,
                        &primary,
                        req.start_version,
                        req.advise_lock_ttl,
                    )?)
                },
            )
            .await;
        match r {
            Ok(ttl) => resp.lock_ttl = ttl,
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    pub async fn kv_pessimistic_lock(
        &self,
        req: PessimisticLockRequest,
    ) -> RespResult<PessimisticLockResponse> {
        let ctx = self.check_ctx(&req.context)?;
        for m in &req.mutations {
            self.check_key(&m.key)?;
        }
        let mut resp = PessimisticLockResponse::default();
        let keys: Vec<Vec<u8>> = req.mutations.iter().map(|m| m.key.clone()).collect();
        let ks = keys.clone();
        let r = self
            .txn_cmd(&ctx, &keys, req.start_version, |txn, reader, _| {
                let mut values = vec![];
                for k in &ks {
                    values.push(atoll_txn::acquire_pessimistic_lock(
                        txn,
                        reader,
                        k,
                        &req.primary_lock,
                        req.start_version,
                        req.for_update_ts,
                        req.lock_ttl,
                        req.return_values,
                    )?);
                }
                Ok(values)
            })
            .await;
        match r {
            Ok(values) => {
                for v in values {
                    resp.not_founds.push(v.is_none());
                    resp.values.push(v.unwrap_or_default());
                }
            }
            Err(f) => fail_into!(resp, f, keys),
        }
        Ok(resp)
    }

    pub async fn kv_pessimistic_rollback(
        &self,
        req: PessimisticRollbackRequest,
    ) -> RespResult<PessimisticRollbackResponse> {
        let ctx = self.check_ctx(&req.context)?;
        let mut resp = PessimisticRollbackResponse::default();
        let keys = req.keys.clone();
        let r = self
            .txn_cmd(&ctx, &req.keys, req.start_version, |txn, reader, _| {
                for k in &keys {
                    atoll_txn::pessimistic_rollback(
                        txn,
                        reader,
                        k,
                        req.start_version,
                        req.for_update_ts,
                    )?;
                }
                Ok(())
            })
            .await;
        if let Err(f) = r {
            fail_into!(resp, f, keys);
        }
        Ok(resp)
    }

    pub async fn kv_scan_lock(&self, req: ScanLockRequest) -> RespResult<ScanLockResponse> {
        let ctx = self.check_ctx(&req.context)?;
        let mut resp = ScanLockResponse::default();
        let r: Result<Vec<LockInfo>, Fail> = async {
            let snap = self.read_snapshot(&ctx, 0, None, None).await?;
            let r = &snap.region;
            let start = if req.start_key.as_slice() < r.start_key.as_slice() {
                r.start_key.clone()
            } else {
                req.start_key.clone()
            };
            let end =
                if req.end_key.is_empty() || (!r.end_key.is_empty() && req.end_key > r.end_key) {
                    r.end_key.clone()
                } else {
                    req.end_key.clone()
                };
            let locks = MvccReader::new(snap.snap.clone()).scan_locks(
                &start,
                &end,
                req.max_version,
                req.limit as usize,
            )?;
            Ok(locks
                .into_iter()
                .map(|(k, l)| l.into_lock_info(k))
                .collect())
        }
        .await;
        match r {
            Ok(l) => resp.locks = l,
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    // ---------------- admin ----------------

    pub async fn split_region(&self, req: SplitRegionRequest) -> RespResult<SplitRegionResponse> {
        let ctx = self.check_ctx(&req.context)?;
        for k in &req.split_keys {
            self.check_key(k)?;
        }
        let mut resp = SplitRegionResponse::default();
        if let Err(Fail::Region(e)) = self.check_store(&ctx) {
            resp.region_error = Some(*e);
            return Ok(resp);
        }
        let mut keys = req.split_keys.clone();
        keys.sort();
        keys.dedup();
        match self
            .router
            .split_async(ctx.region_id, ctx.region_epoch.unwrap_or_default(), keys)
            .await
        {
            Ok(w) => {
                fail::fail_point!(FP_AFTER_WRITE_APPLIED, |_| {
                    resp.region_error = Some(atoll_raftstore::Error::StaleCommand.into());
                    Ok(resp.clone())
                });
                resp.regions = w.regions
            }
            Err(e) if e.is_region_error() => resp.region_error = Some(e.into()),
            Err(e) => resp.error = e.to_string(),
        }
        Ok(resp)
    }

    // ---------------- background: GC ----------------

    /// GC of old versions below PD's safe point, region by region (leaders only), in bounded
    /// batches; runs until `stop`.
    pub async fn run_background(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut t = tokio::time::interval(self.cfg.gc_interval.0);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = t.tick() => {}
                _ = stop.changed() => return,
            }
            let sp = match self.pd.get_gc_safe_point().await {
                Ok(sp) => sp,
                Err(_) => continue,
            };
            if sp <= self.safe_point.load(Ordering::Relaxed) {
                continue;
            }
            self.safe_point.store(sp, Ordering::Relaxed);
            GC_SAFE_POINT.set(sp as i64);
            let n = self.gc_once(sp, &mut stop).await;
            tracing::info!(safe_point = sp, removed = n, "GC pass done");
        }
    }

    /// One pass over the regions this store leads. Returns the versions removed.
    pub async fn gc_once(
        &self,
        safe_point: u64,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> u64 {
        let mut removed = 0u64;
        for (region, leader) in self.router.regions() {
            if !leader {
                continue;
            }
            let mut from = region.start_key.clone();
            loop {
                if *stop.borrow() {
                    return removed;
                }
                let ctx = Context {
                    region_id: region.id,
                    region_epoch: region.region_epoch,
                    peer: None,
                    ..Default::default()
                };
                let Ok(snap) = self.write_snapshot(&ctx) else {
                    break;
                };
                let reader = MvccReader::new(snap.snap.clone());
                let Ok((mods, resume)) = atoll_txn::gc_key_range(
                    &reader,
                    &from,
                    &snap.region.end_key,
                    safe_point,
                    self.cfg.gc_batch_keys,
                ) else {
                    break;
                };
                let n = mods.len() as u64;
                if n > 0 {
                    if self.propose(&ctx, &snap.region, mods).await.is_err() {
                        break;
                    }
                    removed += n;
                    GC_DELETES.inc_by(n);
                }
                match resume {
                    Some(k) => from = k,
                    None => break,
                }
                // Leave room for foreground work between batches.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        removed
    }
}

atoll_util::metric!(
    /// Engine deletes issued by GC (old versions and their values) below the safe point.
    static GC_DELETES: atoll_util::metrics::IntCounter = int_counter(
        "atoll_gc_deletes_total",
        "Engine deletes issued by GC (old versions and their values)"
    )
);
atoll_util::metric!(
    /// The GC safe point this store last acted on (a TSO timestamp).
    static GC_SAFE_POINT: atoll_util::metrics::IntGauge = int_gauge(
        "atoll_gc_safe_point",
        "GC safe point this store last acted on (TSO timestamp)"
    )
);
