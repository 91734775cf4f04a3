//! The core of [`Storage`]: what every command shares — validation, linearizable and
//! leader snapshots, the rule for answers that write nothing, proposals, timestamps.

use crate::config::StorageConfig;
use atoll_engine::KvEngine;
use atoll_pd_client::PdClient;
use atoll_proto::kvrpcpb::*;
use atoll_proto::raft_cmdpb::{self, CmdType, RaftCmdRequest, RaftRequestHeader};
use atoll_proto::{errorpb, metapb};
use atoll_raftstore::{RaftRouter, RegionId, RegionSnapshot};
use atoll_txn::{ConcurrencyManager, Latches, Modify};
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

pub(crate) const DELETE_RANGE_BATCH: usize = 1024;

pub(crate) type RespResult<T> = Result<T, Status>;

/// Why a command did not run: a region error for the client to act on, or a key error.
#[derive(Debug)]
pub enum Fail {
    Region(Box<errorpb::Error>),
    Key(Box<KeyError>),
    /// Several keys failed (prewrite reports every lock it met).
    Keys(Vec<KeyError>),
}

impl Fail {
    pub fn region(e: atoll_raftstore::Error) -> Fail {
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

pub fn abort(msg: impl Into<String>) -> Fail {
    Fail::Key(Box::new(KeyError {
        abort: msg.into(),
        ..Default::default()
    }))
}

/// Fills a response's region error or key error from a failure.
macro_rules! fail_into_impl {
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
pub(crate) use fail_into_impl as fail_into;

pub struct Permit<'a>(&'a AtomicUsize);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Storage<E: KvEngine> {
    pub(crate) router: RaftRouter<E>,
    pub(crate) pd: Arc<dyn PdClient>,
    pub(crate) cfg: StorageConfig,
    pub(crate) latches: Latches,
    pub(crate) cm: ConcurrencyManager,
    /// region id -> term for which max_ts was synced with PD.
    pub(crate) synced: Mutex<HashMap<u64, u64>>,
    pub(crate) inflight: AtomicUsize,
    pub(crate) safe_point: AtomicU64,
    /// The largest timestamp this store has had from PD itself: every timestamp PD hands out
    /// from now on is above it ([`Storage::commit_wait`]).
    pub(crate) issued: AtomicU64,
    /// The safe point of the last GC pass finished (see gc.rs).
    pub(crate) gc_done: tokio::sync::watch::Sender<u64>,
    /// Starts a GC pass now instead of at the next interval.
    pub(crate) gc_kick: tokio::sync::Notify,
    /// What the apply side wrote, for the regions whose changes are asked about (changes.rs).
    pub(crate) changes: Arc<crate::changes::ChangeLog>,
    /// The timers of the etcd leases whose records lie in regions this store leads (lease.rs).
    pub(crate) leases: Arc<crate::lease::LeaseTable>,
}

pub(crate) fn header(ctx: &Context) -> RaftRequestHeader {
    RaftRequestHeader {
        region_id: ctx.region_id,
        peer: ctx.peer,
        region_epoch: ctx.region_epoch,
        keys: vec![],
    }
}

pub(crate) fn key_not_in_region(key: &[u8], r: &metapb::Region) -> Fail {
    Fail::region(atoll_raftstore::Error::KeyNotInRegion {
        key: key.to_vec(),
        region_id: r.id,
        start_key: r.start_key.clone(),
        end_key: r.end_key.clone(),
    })
}

pub(crate) fn check_in_region(keys: &[&[u8]], r: &metapb::Region) -> Result<(), Fail> {
    for k in keys {
        if !atoll_keys::in_range(k, &r.start_key, &r.end_key) {
            return Err(key_not_in_region(k, r));
        }
    }
    Ok(())
}

pub(crate) fn to_requests(mods: Vec<Modify>) -> Vec<raft_cmdpb::Request> {
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
        let changes = Arc::new(crate::changes::ChangeLog::default());
        let leases = Arc::new(crate::lease::LeaseTable::default());
        router.set_apply_observer(Arc::new(crate::lease::Fanout(vec![
            changes.clone() as Arc<dyn atoll_raftstore::observer::ApplyObserver>,
            leases.clone(),
        ])));
        Storage {
            changes,
            leases,
            latches: Latches::new(cfg.latch_slots),
            cm: ConcurrencyManager::new(0),
            synced: Mutex::new(HashMap::new()),
            inflight: AtomicUsize::new(0),
            safe_point: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            gc_done: tokio::sync::watch::Sender::new(0),
            gc_kick: tokio::sync::Notify::new(),
            router,
            pd,
            cfg,
        }
    }

    pub fn max_ts(&self) -> u64 {
        self.cm.max_ts()
    }

    /// The etcd lease timers this store owns (lease.rs).
    pub fn lease_table(&self) -> &Arc<crate::lease::LeaseTable> {
        &self.leases
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

    pub(crate) fn check_key(&self, key: &[u8]) -> RespResult<()> {
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

    pub(crate) fn check_value(&self, value: &[u8]) -> RespResult<()> {
        if value.len() as u64 > self.cfg.max_value_size.0 {
            return Err(Status::invalid_argument(format!(
                "value of {} bytes exceeds the limit of {} bytes",
                value.len(),
                self.cfg.max_value_size.0
            )));
        }
        Ok(())
    }

    pub(crate) fn check_ctx(&self, ctx: &Option<Context>) -> RespResult<Context> {
        let ctx = ctx
            .clone()
            .ok_or_else(|| Status::invalid_argument("request without context"))?;
        if ctx.region_id == 0 {
            return Err(Status::invalid_argument("context without a region id"));
        }
        Ok(ctx)
    }

    pub(crate) fn check_store(&self, ctx: &Context) -> Result<(), Fail> {
        if let Some(p) = &ctx.peer {
            if p.store_id != 0 && p.store_id != self.router.store_id().get() {
                return Err(Fail::region(atoll_raftstore::Error::StoreNotMatch {
                    request_store_id: p.store_id,
                    actual_store_id: self.router.store_id().get(),
                }));
            }
        }
        Ok(())
    }

    // ---------------- snapshots ----------------

    /// A linearizable snapshot for reading at `ts` (0 = latest). `keys`/`range` are what the
    /// read touches (for in-memory lock checks).
    pub(crate) async fn read_snapshot(
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
            let region = self
                .router
                .region(RegionId(ctx.region_id))
                .ok_or(Fail::region(atoll_raftstore::Error::RegionNotFound(
                    ctx.region_id,
                )))?;
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
    pub(crate) fn write_snapshot(
        &self,
        ctx: &Context,
    ) -> Result<RegionSnapshot<E::Snapshot>, Fail> {
        self.check_store(ctx)?;
        Ok(self
            .router
            .local_leader_snapshot(RegionId(ctx.region_id), ctx.region_epoch.as_ref())?)
    }

    /// A leader snapshot that is as fresh as a linearizable read: served under the leader
    /// lease, or after a ReadIndex round (which a deposed leader cannot complete).
    pub(crate) async fn confirmed_snapshot(
        &self,
        ctx: &Context,
    ) -> Result<RegionSnapshot<E::Snapshot>, Fail> {
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
    pub(crate) async fn decide_on_leader<T>(
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

    /// Proposes `mods` and waits until they are applied (or refused). `hold` — the command's
    /// latches and in-memory locks — is released only then, whatever happens to the request:
    /// a client that gives up does not free the keys while its write is still in raft (a
    /// command deciding on them meanwhile would not see that write, and commit above it).
    pub(crate) async fn propose<H: Send + 'static>(
        &self,
        ctx: &Context,
        region: &metapb::Region,
        mods: Vec<Modify>,
        hold: H,
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
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.router.propose(
            cmd,
            Box::new(move |r| {
                drop(hold);
                let _ = tx.send(r);
            }),
        );
        rx.await
            .unwrap_or(Err(atoll_raftstore::Error::StaleCommand))?;
        Ok(())
    }

    /// A new leader has not seen the reads its predecessors served: learn a timestamp above
    /// all of them before choosing commit timestamps.
    pub(crate) async fn ensure_max_ts_synced(&self, region_id: u64, term: u64) -> Result<(), Fail> {
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
        self.issued.fetch_max(ts, Ordering::AcqRel);
        self.cm.update_max_ts(ts);
        self.synced.lock().insert(region_id, term);
        Ok(())
    }

    /// A fresh timestamp from PD, remembered as handed out.
    pub(crate) async fn fresh_ts(&self) -> Result<u64, Fail> {
        let ts = self
            .pd
            .get_tso()
            .await
            .map_err(|e| abort(format!("TSO: {e}")))?;
        self.issued.fetch_max(ts, Ordering::AcqRel);
        Ok(ts)
    }

    /// A one-phase commit timestamp above max_ts, `start_ts` and `newest` (the keys' newest
    /// versions) that PD handed out to this command alone: `start_ts + 1` when `reserved`
    /// (plain and etcd writes name themselves with a block of two timestamps from PD, the
    /// second kept for their commit; see [`atoll_proto`]'s `start_version` docs) and it is
    /// still above max_ts, else the second of a fresh pair. So no two commands anywhere share
    /// a commit timestamp (etcd revisions are unique), and every commit timestamp was handed
    /// out by PD before the commit was chosen: a read that starts after the answer reads
    /// above it, and a change feed that learns a timestamp from PD after some moment knows
    /// every commit chosen before that moment is at or below it.
    pub(crate) async fn one_pc_commit_ts(
        &self,
        start_ts: u64,
        newest: u64,
        reserved: bool,
    ) -> Result<u64, Fail> {
        let candidate = start_ts.saturating_add(1);
        if reserved && candidate > newest && self.cm.claim_commit_ts(candidate) {
            return Ok(candidate);
        }
        // A fresh pair is above every timestamp PD handed out before, so above every commit
        // and every honest read. A read at a timestamp PD has not reached yet (a client's
        // clock ahead) is waited out, briefly: PD's clock is real time.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let ts = self.fresh_pair().await?;
            if ts > newest && self.cm.claim_commit_ts(ts) {
                return Ok(ts);
            }
            if Instant::now() >= deadline {
                return Err(abort(format!(
                    "no commit timestamp above max_ts {} and the keys' newest version \
                     {newest}: they are ahead of PD's clock",
                    self.cm.max_ts()
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The second of two consecutive fresh timestamps from PD (the first is never used: the
    /// second is then this caller's alone).
    pub(crate) async fn fresh_pair(&self) -> Result<u64, Fail> {
        let first = self
            .pd
            .get_tso_block(2)
            .await
            .map_err(|e| abort(format!("TSO: {e}")))?;
        self.issued.fetch_max(first + 1, Ordering::AcqRel);
        Ok(first + 1)
    }

    /// Returns once PD has handed out a timestamp at or above `ts`, the commit (or read)
    /// timestamp of an answer about to go out: every read that starts after the answer then
    /// gets a timestamp at or above `ts` and sees what was answered. One-phase timestamps
    /// come from max_ts + 1, and max_ts from the timestamps of reads and other one-phase
    /// commits, so `ts` can run ahead of PD by a few steps when commits chain on one region
    /// within one millisecond of PD's clock. `start_ts` is a timestamp PD handed out before
    /// `ts` was picked: `ts <= start_ts + 1` needs no wait (every later timestamp is above
    /// `start_ts`), nor does `ts` at or below a timestamp this store has had from PD. Else it
    /// asks PD (requests of concurrent callers are batched; `atoll_commit_wait_tso_total`
    /// counts them); PD's clock passes `ts` within a millisecond.
    pub(crate) async fn commit_wait(&self, ts: u64, start_ts: u64) -> Result<(), Fail> {
        if ts <= start_ts.saturating_add(1) {
            return Ok(());
        }
        // Every timestamp this process had from PD counts (the etcd layer's fresh start
        // timestamps arrive all the time under load): most answers need no request.
        while ts
            > self
                .issued
                .load(Ordering::Acquire)
                .max(self.pd.tso_high_water())
        {
            COMMIT_WAIT_TSO.inc();
            self.fresh_ts().await?;
        }
        Ok(())
    }
}

atoll_util::metric!(
    /// Timestamps asked of PD before answering a one-phase commit whose timestamp ran ahead of
    /// every timestamp this process had from PD (see `Storage::commit_wait`).
    static COMMIT_WAIT_TSO: atoll_util::metrics::IntCounter = int_counter(
        "atoll_commit_wait_tso_total",
        "Timestamps asked of PD before answering a one-phase commit that ran ahead of PD"
    )
);
