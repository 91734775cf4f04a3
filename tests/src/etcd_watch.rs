//! Recording etcd writes and watch streams over gRPC, for [`crate::watch_check`]: the writers
//! and watchers of the chaos suite and of `tests/watch.rs`.
//!
//! - [`write`] makes one Put / DeleteRange / Txn and returns what the checker needs: the ops
//!   it did (deletes from `prev_kvs`) at its revision, or its ops with an unknown outcome.
//! - [`run_watcher`] keeps one watch alive on a list of nodes: on an error, a cancel, a node
//!   that stops answering progress requests, it resumes on the next node at "last revision
//!   seen + 1", recording every response of every incarnation in a shared [`WatcherLog`];
//!   once [`WatchCtl::catch_up_to`] is set it asks for progress until a progress notification
//!   reaches that revision.

use crate::watch_check::{Incarnation, Response, Rev, WatcherLog, Write, WriteOp, WriteOutcome};
use atoll_proto::etcdserverpb::kv_client::KvClient;
use atoll_proto::etcdserverpb::watch_client::WatchClient;
use atoll_proto::etcdserverpb::watch_create_request::FilterType;
use atoll_proto::etcdserverpb::{
    request_op, response_op, watch_request, DeleteRangeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// A lazily connected channel to `addr` (`host:port`), with keepalives that notice a frozen
/// peer within a few seconds.
pub fn channel(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .connect_lazy()
}

pub fn kv_client(addr: &str) -> KvClient<Channel> {
    KvClient::new(channel(addr))
}

/// The current revision as `node` reports it (`header.revision` of a Range of `key`).
pub async fn current_revision(node: &str, key: &[u8]) -> Result<Rev, tonic::Status> {
    let mut kv = kv_client(node);
    let r = kv
        .range(RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.header.map_or(0, |h| h.revision))
}

/// Makes one write: a Put for a single put, a DeleteRange (with `prev_kv`) for a single
/// delete, a Txn of every op otherwise (no compares). An error or no answer within `timeout`
/// gives an unknown outcome.
pub async fn write(kv: &mut KvClient<Channel>, ops: &[WriteOp], timeout: Duration) -> Write {
    let unknown = || Write {
        ops: ops.to_vec(),
        outcome: WriteOutcome::Unknown,
    };
    let deleted = |keys: &[atoll_proto::mvccpb::KeyValue]| -> Vec<WriteOp> {
        keys.iter()
            .map(|p| WriteOp::delete(p.key.clone()))
            .collect()
    };
    match ops {
        [WriteOp::Put { key, value }] => {
            let mut req = tonic::Request::new(PutRequest {
                key: key.clone(),
                value: value.clone(),
                ..Default::default()
            });
            req.set_timeout(timeout);
            match tokio::time::timeout(timeout, kv.put(req)).await {
                Ok(Ok(r)) => Write {
                    ops: ops.to_vec(),
                    outcome: WriteOutcome::Acked(r.into_inner().header.map_or(0, |h| h.revision)),
                },
                _ => unknown(),
            }
        }
        [WriteOp::Delete { key }] => {
            let mut req = tonic::Request::new(DeleteRangeRequest {
                key: key.clone(),
                prev_kv: true,
                ..Default::default()
            });
            req.set_timeout(timeout);
            match tokio::time::timeout(timeout, kv.delete_range(req)).await {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    Write {
                        ops: deleted(&r.prev_kvs),
                        outcome: WriteOutcome::Acked(r.header.map_or(0, |h| h.revision)),
                    }
                }
                _ => unknown(),
            }
        }
        _ => {
            let success = ops
                .iter()
                .map(|op| RequestOp {
                    request: Some(match op {
                        WriteOp::Put { key, value } => {
                            request_op::Request::RequestPut(PutRequest {
                                key: key.clone(),
                                value: value.clone(),
                                ..Default::default()
                            })
                        }
                        WriteOp::Delete { key } => {
                            request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                                key: key.clone(),
                                prev_kv: true,
                                ..Default::default()
                            })
                        }
                    }),
                })
                .collect();
            let mut req = tonic::Request::new(TxnRequest {
                compare: vec![],
                success,
                failure: vec![],
            });
            req.set_timeout(timeout);
            match tokio::time::timeout(timeout, kv.txn(req)).await {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    assert!(r.succeeded, "a txn without compares failed: {r:?}");
                    assert_eq!(r.responses.len(), ops.len(), "a txn's answers: {r:?}");
                    let mut done = vec![];
                    for (op, resp) in ops.iter().zip(&r.responses) {
                        match (op, &resp.response) {
                            (WriteOp::Put { .. }, Some(response_op::Response::ResponsePut(_))) => {
                                done.push(op.clone())
                            }
                            (
                                WriteOp::Delete { .. },
                                Some(response_op::Response::ResponseDeleteRange(d)),
                            ) => done.extend(deleted(&d.prev_kvs)),
                            other => panic!("txn answered {other:?} for {op:?}"),
                        }
                    }
                    Write {
                        ops: done,
                        outcome: WriteOutcome::Acked(r.header.map_or(0, |h| h.revision)),
                    }
                }
                _ => unknown(),
            }
        }
    }
}

/// What a recorded watcher watches and how.
#[derive(Clone, Debug, Default)]
pub struct WatchSpec {
    pub name: String,
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    /// 0: "now".
    pub start_revision: Rev,
    pub prev_kv: bool,
    pub progress_notify: bool,
    pub no_put: bool,
    pub no_delete: bool,
    /// Ask for progress this often (and resume elsewhere when a request stays unanswered for
    /// [`WatchCtl::stall`]); `None`: only when catching up at the end.
    pub request_progress: Option<Duration>,
}

impl WatchSpec {
    pub fn log(&self) -> WatcherLog {
        WatcherLog {
            name: self.name.clone(),
            key: self.key.clone(),
            range_end: self.range_end.clone(),
            prev_kv: self.prev_kv,
            no_put: self.no_put,
            no_delete: self.no_delete,
            incarnations: vec![],
        }
    }

    fn create(&self, start: Rev) -> WatchRequest {
        let mut filters = vec![];
        if self.no_put {
            filters.push(FilterType::Noput as i32);
        }
        if self.no_delete {
            filters.push(FilterType::Nodelete as i32);
        }
        WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: self.key.clone(),
                    range_end: self.range_end.clone(),
                    start_revision: start,
                    progress_notify: self.progress_notify,
                    filters,
                    prev_kv: self.prev_kv,
                    watch_id: 0,
                    fragment: false,
                },
            )),
        }
    }
}

/// A progress request (`WatchProgressRequest`).
pub fn progress_request() -> WatchRequest {
    WatchRequest {
        request_union: Some(watch_request::RequestUnion::ProgressRequest(
            WatchProgressRequest {},
        )),
    }
}

/// Shared control of a set of recorded watchers.
#[derive(Debug)]
pub struct WatchCtl {
    /// Once non-zero: catch up to this revision (a progress notification at or above it),
    /// then end.
    pub catch_up_to: AtomicI64,
    /// End now, caught up or not.
    pub stop: AtomicBool,
    /// How long a progress request may go unanswered before the watcher resumes elsewhere.
    pub stall: Duration,
    /// What [`Response::received_ns`] counts from.
    pub base: Instant,
}

impl WatchCtl {
    pub fn new(stall: Duration) -> Arc<WatchCtl> {
        WatchCtl::with_base(stall, Instant::now())
    }
    pub fn with_base(stall: Duration, base: Instant) -> Arc<WatchCtl> {
        Arc::new(WatchCtl {
            catch_up_to: AtomicI64::new(0),
            stop: AtomicBool::new(false),
            stall,
            base,
        })
    }
}

enum Ended {
    CaughtUp(Rev),
    Compacted(Rev),
    Failed(String),
}

/// Runs one recorded watcher until it catches up ([`WatchCtl::catch_up_to`]) or is stopped;
/// starts on `nodes[first]`, moves to the next node after each failure. Returns the progress
/// revision it caught up to.
pub async fn run_watcher(
    spec: WatchSpec,
    nodes: Vec<String>,
    first: usize,
    ctl: Arc<WatchCtl>,
    log: Arc<Mutex<WatcherLog>>,
) -> Result<Rev, String> {
    let mut next = spec.start_revision;
    let mut node = first;
    let mut last_failure = String::new();
    loop {
        if ctl.stop.load(Ordering::Relaxed) {
            return Err(format!(
                "stopped before catching up (last failure: {last_failure})"
            ));
        }
        let addr = nodes[node % nodes.len()].clone();
        log.lock().incarnations.push(Incarnation {
            start_revision: next,
            node: addr.clone(),
            responses: vec![],
            end: String::new(),
        });
        let ended = incarnation(&spec, &addr, &mut next, &ctl, &log).await;
        let reason = match &ended {
            Ended::CaughtUp(r) => format!("caught up at {r}"),
            Ended::Compacted(c) => format!("compacted at {c}"),
            Ended::Failed(e) => e.clone(),
        };
        if let Some(i) = log.lock().incarnations.last_mut() {
            i.end = reason.clone();
        }
        match ended {
            Ended::CaughtUp(r) => return Ok(r),
            Ended::Compacted(c) => next = next.max(c),
            Ended::Failed(e) => {
                last_failure = e;
                node += 1;
                // Not a synchronization: only keeps a watcher from spinning on dead nodes.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn incarnation(
    spec: &WatchSpec,
    addr: &str,
    next: &mut Rev,
    ctl: &WatchCtl,
    log: &Mutex<WatcherLog>,
) -> Ended {
    let mut client = WatchClient::new(channel(addr));
    let (tx, rx) = futures::channel::mpsc::unbounded::<WatchRequest>();
    let _ = tx.unbounded_send(spec.create(*next));
    let mut stream = match tokio::time::timeout(Duration::from_secs(5), client.watch(rx)).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(e)) => return Ended::Failed(format!("watch on {addr}: {e}")),
        Err(_) => return Ended::Failed(format!("watch on {addr}: no answer in 5 s")),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut created = false;
    let mut outstanding: Option<Instant> = None;
    let mut last_request: Option<Instant> = None;
    let opened = Instant::now();
    loop {
        tokio::select! {
            m = stream.message() => {
                let r: WatchResponse = match m {
                    Ok(Some(r)) => r,
                    Ok(None) => return Ended::Failed(format!("{addr}: stream ended")),
                    Err(e) => return Ended::Failed(format!("{addr}: {e}")),
                };
                let mut resp = Response::from_proto(&r);
                resp.received_ns = ctl.base.elapsed().as_nanos() as u64;
                if let Some(i) = log.lock().incarnations.last_mut() {
                    i.responses.push(resp.clone());
                }
                if resp.created {
                    created = true;
                    if *next == 0 {
                        *next = resp.header_revision + 1;
                    }
                }
                if resp.canceled {
                    if resp.compact_revision != 0 {
                        return Ended::Compacted(resp.compact_revision);
                    }
                    return Ended::Failed(format!("{addr}: canceled: {}", resp.cancel_reason));
                }
                if let Some(last) = resp.events.last() {
                    *next = (*next).max(last.kv.mod_revision + 1);
                } else if resp.is_progress() {
                    outstanding = None;
                    *next = (*next).max(resp.header_revision + 1);
                    let target = ctl.catch_up_to.load(Ordering::Relaxed);
                    if target > 0 && resp.header_revision >= target {
                        return Ended::CaughtUp(resp.header_revision);
                    }
                }
            }
            _ = tick.tick() => {
                if ctl.stop.load(Ordering::Relaxed) {
                    return Ended::Failed("stopped".into());
                }
                if !created {
                    if opened.elapsed() > ctl.stall {
                        return Ended::Failed(format!("{addr}: not created in {:?}", ctl.stall));
                    }
                    continue;
                }
                if outstanding.is_some_and(|t| t.elapsed() > ctl.stall) {
                    return Ended::Failed(format!(
                        "{addr}: a progress request unanswered for {:?}",
                        ctl.stall
                    ));
                }
                let catching_up = ctl.catch_up_to.load(Ordering::Relaxed) > 0;
                let period = if catching_up {
                    Some(Duration::from_millis(500))
                } else {
                    spec.request_progress
                };
                let due = period.is_some_and(|p| last_request.is_none_or(|t| t.elapsed() >= p));
                if due {
                    if tx.unbounded_send(progress_request()).is_err() {
                        return Ended::Failed(format!("{addr}: request stream closed"));
                    }
                    last_request = Some(Instant::now());
                    outstanding.get_or_insert_with(Instant::now);
                }
            }
        }
    }
}

/// The transaction locks in `[start, end)`, read from each region's leader as PD names it
/// (`stores`: store id and address), with the leader's store id.
pub async fn store_locks(
    cl: &atoll_client::Client,
    stores: &[(u64, String)],
    start: &[u8],
    end: &[u8],
) -> Result<Vec<(u64, atoll_proto::kvrpcpb::LockInfo)>, String> {
    use atoll_proto::kvrpcpb;
    let regions = cl
        .pd()
        .scan_regions(start, end, 0)
        .await
        .map_err(|e| format!("regions from PD: {e}"))?;
    let mut out = vec![];
    for r in &regions {
        let g = &r.region;
        let leader = r
            .leader
            .ok_or_else(|| format!("region {}: no leader known", g.id))?;
        let (_, addr) = stores
            .iter()
            .find(|(id, _)| *id == leader.store_id)
            .ok_or_else(|| format!("region {}: leader on unknown store", g.id))?;
        let mut kv = kvrpcpb::kv_client::KvClient::new(channel(addr));
        let req = kvrpcpb::ScanLockRequest {
            context: Some(kvrpcpb::Context {
                region_id: g.id,
                region_epoch: g.region_epoch,
                peer: Some(leader),
                ..Default::default()
            }),
            max_version: u64::MAX,
            start_key: g.start_key.clone(),
            end_key: g.end_key.clone(),
            limit: 0,
        };
        let resp = tokio::time::timeout(Duration::from_secs(5), kv.kv_scan_lock(req))
            .await
            .map_err(|_| format!("region {}: no answer", g.id))?
            .map_err(|e| format!("region {}: {e}", g.id))?
            .into_inner();
        if let Some(e) = resp.region_error {
            return Err(format!("region {}: {e:?}", g.id));
        }
        if let Some(e) = resp.error {
            return Err(format!("region {}: {e:?}", g.id));
        }
        out.extend(resp.locks.into_iter().map(|l| (leader.store_id, l)));
    }
    Ok(out)
}

/// One line for a lock.
pub fn show_lock(store_id: u64, l: &atoll_proto::kvrpcpb::LockInfo) -> String {
    format!(
        "store {store_id}: lock on {} (primary {}, start_ts {}, ttl {} ms, min_commit_ts {})",
        String::from_utf8_lossy(&l.key),
        String::from_utf8_lossy(&l.primary_lock),
        l.lock_version,
        l.lock_ttl,
        l.min_commit_ts
    )
}
