//! etcd's Election service (`v3electionpb.Election`) and the waiting that the Lock service
//! shares with it, built in process on the KV service and the watch machinery, as etcd's
//! server builds them on its own client (`v3election`, `v3lock` over `clientv3/concurrency`).
//!
//! The keys are the client recipes' (`concurrency.Election`, `concurrency.Mutex`), so a
//! campaigner or lock holder through this service and one using etcd's client recipe directly
//! (`etcdctl elect`, `etcdctl lock`, aetcd) take part in the same election or lock:
//!
//! - a candidate's key is `NAME/<lease in lowercase hex>`, created with the txn
//!   `if create_revision(key) == 0 then put(key, value, lease) else get(key)` (a key that
//!   already exists — the same lease campaigning again — is reused, and its value proclaimed
//!   if it differs);
//! - the leader (the lock holder) is the key under `NAME/` with the lowest `create_revision`;
//! - a candidate waits until every key under `NAME/` created before its own is deleted:
//!   it reads the newest of them (`max_create_revision` = its own − 1, sorted by
//!   `create_revision`, limit 1), watches that key from the revision of the read for a
//!   DELETE, and reads again, until none is left. Revisions are PD timestamps with gaps: the
//!   only arithmetic is "below my revision" and "after the read's revision".
//!
//! A call whose client goes away (cancels, times out, disconnects) while it waits stops
//! waiting and deletes its key if it still has the `create_revision` it made or found, as the
//! recipe's `Resign` / `Unlock` does when its context is cancelled; the wait runs in a task of
//! its own so that this clean-up happens even when the call's future is dropped mid-way.
//!
//! Where Atoll is stricter than etcd: once the wait is over, Campaign (as Lock does in etcd)
//! reads its key again and fails with `election: not leader` if it is gone (its lease
//! expired while it waited), where etcd's Campaign would answer success for a key that no
//! longer exists.

use crate::auth::Need;
use crate::errors;
use crate::kv::KvService;
use crate::watch::WatchService;
use atoll_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use atoll_proto::etcdserverpb::kv_server::Kv;
use atoll_proto::etcdserverpb::lease_server::Lease;
use atoll_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use atoll_proto::etcdserverpb::watch_request::RequestUnion;
use atoll_proto::etcdserverpb::{
    request_op, response_op, Compare, DeleteRangeRequest, LeaseGrantRequest, PutRequest,
    RangeRequest, RangeResponse, RequestOp, ResponseHeader, TxnRequest, TxnResponse,
    WatchCreateRequest, WatchRequest, WatchResponse,
};
use atoll_proto::mvccpb::event::EventType;
use atoll_proto::mvccpb::{Event, KeyValue};
use atoll_proto::v3electionpb::election_server::Election;
use atoll_proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse,
};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

/// How long a session lease etcd's server grants for a call made with lease 0 lives
/// (`concurrency.defaultSessionTTL`); it is not kept alive.
pub const DEFAULT_SESSION_TTL: i64 = 60;

/// Leader responses queued per Observe stream.
const OBSERVE_QUEUE: usize = 16;

/// `concurrency.ErrElectionNotLeader`. etcd's server returns it as a plain error, which gRPC
/// sends as `Unknown` with this message.
pub fn not_leader() -> Status {
    Status::new(Code::Unknown, "election: not leader")
}

/// `concurrency.ErrElectionNoLeader` (`Unknown`, as [`not_leader`]).
pub fn no_leader() -> Status {
    Status::new(Code::Unknown, "election: no leader")
}

/// `v3election.ErrMissingLeaderKey`: a Proclaim or Resign without `leader` (`Unknown`).
pub fn missing_leader_key() -> Status {
    Status::new(Code::Unknown, "\"leader\" field must be provided")
}

/// `concurrency.ErrSessionExpired`: a Lock whose key vanished while it waited (`Unknown`).
pub fn session_expired() -> Status {
    Status::new(Code::Unknown, "mutex: session is expired")
}

/// An error as etcd's Election and Lock servers answer it: they call etcd's own client, whose
/// errors are no gRPC statuses any more, so gRPC sends every one as `Unknown` with its
/// message (`etcdserver: requested lease not found`, `etcdserver: key is not provided`, ...,
/// all code 2; clients match etcd's errors by message).
pub fn as_etcd_answers(s: Status) -> Status {
    if s.code() == Code::Unknown {
        s
    } else {
        Status::new(Code::Unknown, s.message())
    }
}

/// etcd's `lost watcher waiting for delete` (the watch ended without a DELETE).
fn lost_watcher() -> Status {
    Status::new(Code::Unknown, "lost watcher waiting for delete")
}

/// Grants a lease of the given TTL in seconds and answers its id (the Lease service's Grant).
pub type GrantFn =
    Arc<dyn Fn(i64) -> Pin<Box<dyn Future<Output = Result<i64, Status>> + Send>> + Send + Sync>;

/// [`GrantFn`] through a Lease service in process.
pub fn grant_through<L: Lease>(lease: Arc<L>) -> GrantFn {
    Arc::new(move |ttl| {
        let lease = lease.clone();
        Box::pin(async move {
            let r = Lease::lease_grant(
                lease.as_ref(),
                crate::auth::internal(LeaseGrantRequest { ttl, id: 0 }),
            )
            .await?
            .into_inner();
            if !r.error.is_empty() {
                return Err(Status::new(Code::Unknown, r.error));
            }
            Ok(r.id)
        })
    })
}

/// A candidate's (or lock waiter's) key: `NAME/` and the lease in hex, as Go's `%x` writes an
/// int64 (lowercase, a minus sign for a negative id).
pub fn candidate_key(prefix: &[u8], lease: i64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    let hex = if lease < 0 {
        format!("-{:x}", lease.unsigned_abs())
    } else {
        format!("{lease:x}")
    };
    k.extend_from_slice(hex.as_bytes());
    k
}

/// `NAME/`: the prefix of an election's or a lock's keys.
pub fn election_prefix(name: &[u8]) -> Vec<u8> {
    let mut p = name.to_vec();
    p.push(b'/');
    p
}

/// etcd's prefix end (`clientv3.GetPrefixRangeEnd`): the first key after every key starting
/// with `p`; `"\0"` (every key) when there is none.
pub fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut end = p.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn op(r: request_op::Request) -> RequestOp {
    RequestOp { request: Some(r) }
}

fn create_rev_is(key: &[u8], rev: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.to_vec(),
        range_end: vec![],
        target_union: Some(TargetUnion::CreateRevision(rev)),
    }
}

fn get(key: &[u8]) -> RangeRequest {
    RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    }
}

/// The oldest (`ascend`) or newest key under `prefix` by `create_revision`
/// (`clientv3.WithFirstCreate` / `WithLastCreate`).
fn by_create(prefix: &[u8], ascend: bool) -> RangeRequest {
    RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: if ascend {
            SortOrder::Ascend
        } else {
            SortOrder::Descend
        } as i32,
        sort_target: SortTarget::Create as i32,
        ..Default::default()
    }
}

fn range_of(resp: &TxnResponse, i: usize) -> Option<&RangeResponse> {
    match resp.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(response_op::Response::ResponseRange(r)) => Some(r),
        _ => None,
    }
}

fn revision(h: &Option<ResponseHeader>) -> i64 {
    h.as_ref().map_or(0, |h| h.revision)
}

/// What a candidate holds once its key exists: the key, its `create_revision`, the lease.
#[derive(Clone, Debug)]
pub struct Candidacy {
    pub key: Vec<u8>,
    pub rev: i64,
    pub lease: i64,
    /// The header of the txn that created (or found) the key.
    pub txn_header: Option<ResponseHeader>,
    /// Whether the key was the oldest already in that txn (no wait).
    pub owner_at_once: bool,
}

/// The recipes (campaign, wait, resign) over the KV and Watch services, shared by the
/// Election and Lock services.
pub struct Recipes {
    pub kv: Arc<KvService>,
    pub watch: Arc<WatchService>,
    /// The Lease service's Grant, for calls made with lease 0 (etcd's server grants such a
    /// call a session lease of [`DEFAULT_SESSION_TTL`]). None (tests without a Lease
    /// service): lease 0 is used as given, keys without a lease.
    pub grant: Option<GrantFn>,
}

impl Recipes {
    pub async fn range(&self, r: RangeRequest) -> Result<RangeResponse, Status> {
        Ok(Kv::range(self.kv.as_ref(), crate::auth::internal(r))
            .await?
            .into_inner())
    }

    pub async fn txn(&self, t: TxnRequest) -> Result<TxnResponse, Status> {
        Ok(Kv::txn(self.kv.as_ref(), crate::auth::internal(t))
            .await?
            .into_inner())
    }

    /// The lease a call runs with: its own, or for 0 a fresh session lease, as etcd's
    /// `concurrency.NewSession` grants one.
    pub async fn session_lease(&self, lease: i64) -> Result<i64, Status> {
        match (&self.grant, lease) {
            (Some(grant), 0) => grant(DEFAULT_SESSION_TTL).await,
            _ => Ok(lease),
        }
    }

    /// Creates (or finds) the candidate key of `lease` under `prefix` with `value`, in one txn
    /// that also reads the oldest key under the prefix (`Mutex.tryAcquire`; Campaign's txn
    /// plus that read).
    pub async fn enter(
        &self,
        prefix: &[u8],
        lease: i64,
        value: &[u8],
    ) -> Result<(Candidacy, Option<KeyValue>), Status> {
        let key = candidate_key(prefix, lease);
        let put = PutRequest {
            key: key.clone(),
            value: value.to_vec(),
            lease,
            ..Default::default()
        };
        let owner = by_create(prefix, true);
        let t = TxnRequest {
            compare: vec![create_rev_is(&key, 0)],
            success: vec![
                op(request_op::Request::RequestPut(put)),
                op(request_op::Request::RequestRange(owner.clone())),
            ],
            failure: vec![
                op(request_op::Request::RequestRange(get(&key))),
                op(request_op::Request::RequestRange(owner)),
            ],
        };
        let resp = self.txn(t).await?;
        let (rev, existing) = if resp.succeeded {
            (revision(&resp.header), None)
        } else {
            let kv = range_of(&resp, 0)
                .and_then(|r| r.kvs.first())
                .cloned()
                .ok_or_else(|| errors::atoll(Code::Internal, "candidate txn read no key"))?;
            (kv.create_revision, Some(kv))
        };
        let first = range_of(&resp, 1).and_then(|r| r.kvs.first()).cloned();
        let owner_at_once = first.as_ref().is_none_or(|f| f.create_revision == rev);
        Ok((
            Candidacy {
                key,
                rev,
                lease,
                txn_header: resp.header,
                owner_at_once,
            },
            existing,
        ))
    }

    /// Waits until no key under `prefix` has a `create_revision` below `rev`
    /// (`concurrency.waitDeletes`); the header of the last read.
    pub async fn wait_deletes(&self, prefix: &[u8], rev: i64) -> Result<ResponseHeader, Status> {
        loop {
            let mut r = by_create(prefix, false);
            r.max_create_revision = rev - 1;
            let resp = self.range(r).await?;
            let Some(last) = resp.kvs.first() else {
                return Ok(resp.header.unwrap_or_default());
            };
            self.wait_delete(&last.key, revision(&resp.header)).await?;
        }
    }

    /// Waits for a DELETE of `key` at or after revision `from` (`concurrency.waitDelete`).
    pub async fn wait_delete(&self, key: &[u8], from: i64) -> Result<(), Status> {
        let mut w = self.watch_from(key, &[], from).await;
        while let Some(resp) = w.next().await {
            let resp = resp?;
            if resp
                .events
                .iter()
                .any(|e| e.r#type == EventType::Delete as i32)
            {
                return Ok(());
            }
        }
        Err(lost_watcher())
    }

    /// Watches `[key, range_end)` (etcd's forms) from revision `from` through the watch
    /// machinery, in process: the responses with events, ending with an error when the watch
    /// is cancelled (compaction). Dropping the stream ends the watch.
    pub async fn watch_from(&self, key: &[u8], range_end: &[u8], from: i64) -> InternalWatch {
        let (req_tx, req_rx) = mpsc::channel(1);
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: key.to_vec(),
                range_end: range_end.to_vec(),
                start_revision: from.max(1),
                ..Default::default()
            })),
        };
        // The channel has room for it: this cannot wait.
        let _ = req_tx.send(Ok(create)).await;
        let rx = self.watch.serve(ReceiverStream::new(req_rx));
        InternalWatch {
            _requests: req_tx,
            responses: rx,
        }
    }

    /// Deletes `key` if its `create_revision` is still `rev` (`Election.Resign`).
    pub async fn resign(&self, key: &[u8], rev: i64) -> Result<TxnResponse, Status> {
        let t = TxnRequest {
            compare: vec![create_rev_is(key, rev)],
            success: vec![op(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: key.to_vec(),
                    ..Default::default()
                },
            ))],
            failure: vec![],
        };
        self.txn(t).await
    }

    /// Puts `value` on `key` with `lease` if its `create_revision` is still `rev`
    /// (`Election.Proclaim`): `election: not leader` otherwise.
    pub async fn proclaim(
        &self,
        key: &[u8],
        rev: i64,
        lease: i64,
        value: &[u8],
    ) -> Result<TxnResponse, Status> {
        let t = TxnRequest {
            compare: vec![create_rev_is(key, rev)],
            success: vec![op(request_op::Request::RequestPut(PutRequest {
                key: key.to_vec(),
                value: value.to_vec(),
                lease,
                ..Default::default()
            }))],
            failure: vec![],
        };
        let resp = self.txn(t).await?;
        if !resp.succeeded {
            return Err(not_leader());
        }
        Ok(resp)
    }

    /// The key of `rev` at `key`, read now: present with that `create_revision` or not.
    pub async fn still_there(&self, key: &[u8], rev: i64) -> Result<(bool, RangeResponse), Status> {
        let resp = self.range(get(key)).await?;
        let there = resp.kvs.first().is_some_and(|kv| kv.create_revision == rev);
        Ok((there, resp))
    }
}

/// A watch made in process ([`Recipes::watch_from`]).
pub struct InternalWatch {
    _requests: mpsc::Sender<Result<WatchRequest, Status>>,
    responses: mpsc::Receiver<Result<WatchResponse, Status>>,
}

impl InternalWatch {
    /// The next response that carries events; an error when the watch was cancelled; None
    /// when the watch machinery went away.
    pub async fn next(&mut self) -> Option<Result<WatchResponse, Status>> {
        loop {
            let resp = match self.responses.recv().await? {
                Ok(r) => r,
                Err(s) => return Some(Err(s)),
            };
            if resp.canceled {
                let status = if resp.compact_revision > 0 {
                    errors::compacted()
                } else if resp.cancel_reason.is_empty() {
                    errors::watch_canceled()
                } else {
                    Status::new(Code::Unknown, resp.cancel_reason)
                };
                return Some(Err(status));
            }
            if !resp.events.is_empty() {
                return Some(Ok(resp));
            }
        }
    }
}

/// Runs `work` in a task of its own with a signal that fires when the caller's future is
/// dropped (the client went away); answers what the task answers.
pub async fn detached<T, F, Fut>(work: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(oneshot::Receiver<()>) -> Fut,
    Fut: Future<Output = Result<T, Status>> + Send + 'static,
{
    let (alive, gone) = oneshot::channel::<()>();
    let task = tokio::spawn(work(gone));
    let out = task.await;
    drop(alive);
    match out {
        Ok(r) => r,
        Err(e) => Err(errors::atoll(Code::Internal, format!("task failed: {e}"))),
    }
}

/// Waits for the wait to end or the caller to go away (`Err(())`).
async fn unless_gone<T>(
    gone: &mut oneshot::Receiver<()>,
    f: impl Future<Output = T>,
) -> Result<T, ()> {
    tokio::select! {
        r = f => Ok(r),
        _ = gone => Err(()),
    }
}

impl Recipes {
    /// The whole acquisition of `NAME/<lease>` (Campaign, Lock): enter, wait for the keys
    /// before it, check the key is still there. `value` is proclaimed on a key found with
    /// another value when `proclaim` (Campaign; Lock keeps the value it finds). Runs
    /// detached: if the caller goes away before it ends, the key is deleted (if it still
    /// has the `create_revision` made or found) and the task ends.
    pub async fn acquire(
        self: &Arc<Self>,
        name: &[u8],
        lease: i64,
        value: Vec<u8>,
        proclaim: bool,
    ) -> Result<(Candidacy, ResponseHeader), Status> {
        let me = self.clone();
        let prefix = election_prefix(name);
        detached(move |mut gone| async move {
            // The txn runs to its end even if the caller goes: then it is undone.
            let (c, existing) = me.enter(&prefix, lease, &value).await?;
            let cleanup = |me: Arc<Recipes>, c: Candidacy| async move {
                if let Err(e) = me.resign(&c.key, c.rev).await {
                    tracing::warn!(key = ?String::from_utf8_lossy(&c.key), error = %e,
                        "could not delete the key of an abandoned campaign");
                }
            };
            if gone.try_recv() != Err(oneshot::error::TryRecvError::Empty) {
                cleanup(me.clone(), c.clone()).await;
                return Err(errors::canceled());
            }
            if proclaim && existing.is_some_and(|kv| kv.value != value) {
                if let Err(e) = me.proclaim(&c.key, c.rev, lease, &value).await {
                    cleanup(me.clone(), c.clone()).await;
                    return Err(e);
                }
            }
            let header = if c.owner_at_once {
                // Owner in the txn itself (`Mutex.tryAcquire`).
                c.txn_header.unwrap_or_default()
            } else {
                match unless_gone(&mut gone, me.wait_deletes(&prefix, c.rev)).await {
                    Err(()) => {
                        cleanup(me.clone(), c.clone()).await;
                        return Err(errors::canceled());
                    }
                    Ok(Err(e)) => {
                        // etcd: the Mutex deletes its key on any failed wait; Campaign keeps
                        // it unless its context is cancelled. Atoll deletes it in both cases:
                        // a waiter that gave up must not become leader later unseen.
                        cleanup(me.clone(), c.clone()).await;
                        return Err(e);
                    }
                    Ok(Ok(_)) => {
                        // The key must still be there: its lease may have expired meanwhile.
                        let (there, resp) =
                            match unless_gone(&mut gone, me.still_there(&c.key, c.rev)).await {
                                Err(()) => {
                                    cleanup(me.clone(), c.clone()).await;
                                    return Err(errors::canceled());
                                }
                                Ok(Err(e)) => {
                                    cleanup(me.clone(), c.clone()).await;
                                    return Err(e);
                                }
                                Ok(Ok(x)) => x,
                            };
                        if !there {
                            return Err(if proclaim {
                                not_leader()
                            } else {
                                session_expired()
                            });
                        }
                        resp.header.unwrap_or_default()
                    }
                }
            };
            Ok((c, header))
        })
        .await
    }
}

/// The Election service.
pub struct ElectionService {
    recipes: Arc<Recipes>,
    pub(crate) ctx: Arc<crate::context::EtcdContext>,
}

impl ElectionService {
    pub fn new(ctx: Arc<crate::context::EtcdContext>, recipes: Arc<Recipes>) -> Self {
        ElectionService { recipes, ctx }
    }
}

/// One Observe stream: the leader of `prefix` and every value it proclaims, then the next
/// leader, ... (`Election.observe`), until the receiver goes away or a read fails.
async fn observe(
    recipes: Arc<Recipes>,
    ctx: Arc<crate::context::EtcdContext>,
    prefix: Vec<u8>,
    out: mpsc::Sender<Result<LeaderResponse, Status>>,
) {
    let leader = |h: Option<ResponseHeader>, kv: KeyValue| LeaderResponse {
        header: h,
        kv: Some(kv),
    };
    loop {
        let resp = tokio::select! {
            r = recipes.range(by_create(&prefix, true)) => r,
            _ = out.closed() => return,
        };
        let resp = match resp {
            Ok(r) => r,
            Err(s) => {
                let _ = out.send(Err(as_etcd_answers(s))).await;
                return;
            }
        };
        let (header, kv) = if let Some(kv) = resp.kvs.first() {
            (resp.header, kv.clone())
        } else {
            // No leader: the first key put under the prefix from the read on.
            let mut w = recipes
                .watch_from(&prefix, &prefix_end(&prefix), revision(&resp.header))
                .await;
            let put = loop {
                let r = tokio::select! {
                    r = w.next() => r,
                    _ = out.closed() => return,
                };
                match r {
                    Some(Ok(r)) => {
                        if let Some(e) = first_put(&r.events) {
                            break e;
                        }
                    }
                    Some(Err(s)) => {
                        let _ = out.send(Err(as_etcd_answers(s))).await;
                        return;
                    }
                    None => {
                        let _ = out.send(Err(lost_watcher())).await;
                        return;
                    }
                }
            };
            // etcd: the header's revision is the put's (a response may hold several).
            (Some(ctx.header(put.mod_revision)), put)
        };
        let (key, rev) = (kv.key.clone(), revision(&header));
        if out.send(Ok(leader(header, kv))).await.is_err() {
            return;
        }
        // The leader's proclamations until its key is deleted.
        let mut w = recipes.watch_from(&key, &[], rev + 1).await;
        'leader: loop {
            let r = tokio::select! {
                r = w.next() => r,
                _ = out.closed() => return,
            };
            let r = match r {
                Some(Ok(r)) => r,
                Some(Err(s)) => {
                    let _ = out.send(Err(as_etcd_answers(s))).await;
                    return;
                }
                None => {
                    let _ = out.send(Err(lost_watcher())).await;
                    return;
                }
            };
            for e in r.events {
                if e.r#type == EventType::Delete as i32 {
                    break 'leader;
                }
                let Some(kv) = e.kv else { continue };
                if out.send(Ok(leader(r.header, kv))).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn first_put(events: &[Event]) -> Option<KeyValue> {
    events
        .iter()
        .find(|e| e.r#type == EventType::Put as i32)
        .and_then(|e| e.kv.clone())
}

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(
        &self,
        req: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let needs = name_needs(&req.get_ref().name);
        self.ctx
            .auth
            .authorize(&req, &needs)
            .await
            .map_err(as_etcd_answers)?;
        self.do_campaign(req.into_inner())
            .await
            .map(Response::new)
            .map_err(as_etcd_answers)
    }

    async fn proclaim(
        &self,
        req: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let needs = key_needs(req.get_ref().leader.as_ref().map(|l| l.key.as_slice()));
        self.ctx
            .auth
            .authorize(&req, &needs)
            .await
            .map_err(as_etcd_answers)?;
        self.do_proclaim(req.into_inner())
            .await
            .map(Response::new)
            .map_err(as_etcd_answers)
    }

    async fn leader(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let needs = vec![read_prefix(&req.get_ref().name)];
        self.ctx
            .auth
            .authorize(&req, &needs)
            .await
            .map_err(as_etcd_answers)?;
        self.do_leader(req.into_inner())
            .await
            .map(Response::new)
            .map_err(as_etcd_answers)
    }

    type ObserveStream = Pin<Box<dyn Stream<Item = Result<LeaderResponse, Status>> + Send>>;

    async fn observe(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let needs = vec![read_prefix(&req.get_ref().name)];
        self.ctx
            .auth
            .authorize(&req, &needs)
            .await
            .map_err(as_etcd_answers)?;
        let rx = self.serve_observe(req.into_inner());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn resign(
        &self,
        req: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let needs = key_needs(req.get_ref().leader.as_ref().map(|l| l.key.as_slice()));
        self.ctx
            .auth
            .authorize(&req, &needs)
            .await
            .map_err(as_etcd_answers)?;
        self.do_resign(req.into_inner())
            .await
            .map(Response::new)
            .map_err(as_etcd_answers)
    }
}

impl ElectionService {
    async fn do_campaign(&self, r: CampaignRequest) -> Result<CampaignResponse, Status> {
        let lease = self.recipes.session_lease(r.lease).await?;
        let (c, _) = self.recipes.acquire(&r.name, lease, r.value, true).await?;
        Ok(CampaignResponse {
            // etcd answers the header of the campaign's txn.
            header: c.txn_header,
            leader: Some(LeaderKey {
                name: r.name,
                key: c.key,
                rev: c.rev,
                lease: c.lease,
            }),
        })
    }

    async fn do_proclaim(&self, r: ProclaimRequest) -> Result<ProclaimResponse, Status> {
        let l = r.leader.ok_or_else(missing_leader_key)?;
        let lease = self.recipes.session_lease(l.lease).await?;
        let resp = self
            .recipes
            .proclaim(&l.key, l.rev, lease, &r.value)
            .await?;
        Ok(ProclaimResponse {
            header: resp.header,
        })
    }

    async fn do_leader(&self, r: LeaderRequest) -> Result<LeaderResponse, Status> {
        let prefix = election_prefix(&r.name);
        let resp = self.recipes.range(by_create(&prefix, true)).await?;
        let kv = resp.kvs.into_iter().next().ok_or_else(no_leader)?;
        Ok(LeaderResponse {
            header: resp.header,
            kv: Some(kv),
        })
    }

    async fn do_resign(&self, r: ResignRequest) -> Result<ResignResponse, Status> {
        let l = r.leader.ok_or_else(missing_leader_key)?;
        // Answered alike whether the key was still the caller's or not, as etcd.
        let resp = self.recipes.resign(&l.key, l.rev).await?;
        Ok(ResignResponse {
            header: resp.header,
        })
    }

    /// An Observe stream (gRPC and the gateway): its responses on the returned channel,
    /// until the receiver is dropped.
    pub fn serve_observe(
        &self,
        req: LeaderRequest,
    ) -> mpsc::Receiver<Result<LeaderResponse, Status>> {
        let (tx, rx) = mpsc::channel(OBSERVE_QUEUE);
        let prefix = election_prefix(&req.name);
        tokio::spawn(observe(self.recipes.clone(), self.ctx.clone(), prefix, tx));
        rx
    }
}

/// Read on every key under election or lock `name` (`name/`).
pub(crate) fn read_prefix(name: &[u8]) -> Need {
    let p = election_prefix(name);
    Need::read(&p, &prefix_end(&p))
}

/// What a campaign or lock on `name` needs: it reads the keys under `name/` and writes one
/// of them (the caller's, named after a lease it may not have yet), so read and write on all.
pub(crate) fn name_needs(name: &[u8]) -> Vec<Need> {
    let p = election_prefix(name);
    let end = prefix_end(&p);
    vec![Need::read(&p, &end), Need::write(&p, &end)]
}

/// What a call on a held key needs (Proclaim, Resign: a txn comparing and writing the key;
/// Unlock: a delete). No key: the call fails on its own.
pub(crate) fn key_needs(key: Option<&[u8]>) -> Vec<Need> {
    key.map_or(vec![], |k| vec![Need::read(k, b""), Need::write(k, b"")])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_client_recipes() {
        assert_eq!(candidate_key(b"e/", 0x694d_7f2a_1c3b), b"e/694d7f2a1c3b");
        assert_eq!(candidate_key(b"e/", 0), b"e/0");
        assert_eq!(candidate_key(b"e/", -31), b"e/-1f");
        assert_eq!(election_prefix(b"e"), b"e/");
        assert_eq!(prefix_end(b"e/"), b"e0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn errors_are_etcds() {
        assert_eq!(not_leader().message(), "election: not leader");
        assert_eq!(no_leader().message(), "election: no leader");
        assert_eq!(not_leader().code(), Code::Unknown);
        assert_eq!(
            missing_leader_key().message(),
            "\"leader\" field must be provided"
        );
        assert_eq!(session_expired().message(), "mutex: session is expired");
    }
}
