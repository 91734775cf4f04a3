//! etcd's Lease service over sharded lease records (docs/design/leases.md).
//!
//! - A lease is a record in the system key space, in the region its id hashes to
//!   ([`atoll_storage::lease`]); the leader of that region owns its timer. **Grant** writes the
//!   record (an etcd txn on one key: created only if absent). **KeepAlive** and
//!   **TimeToLive** go to the owner ([`Client::lease_keep_alive`]), from whichever store the
//!   client called.
//! - **Put with a lease** (kv.rs) runs as a transaction that also writes an attachment entry
//!   next to the lease and re-reads the record at its commit timestamp: it commits only if the
//!   lease exists and is not expiring then.
//! - **Revoke**, and expiry once the owner marked a lease expiring, delete the attached keys,
//!   their entries and the record in one transaction, at one revision ([`revoke`]); a revoke
//!   that meets a concurrent attach starts over.
//!
//! [`Client::lease_keep_alive`]: atoll_client::Client::lease_keep_alive

use crate::auth::{perm::Access, Caller, Need};
use crate::context::EtcdContext;
use crate::errors;
use crate::kv::{backoff, client_error, same_versions};
use atoll_client::etcd::EtcdTxnOutcome;
use atoll_proto::etcdserverpb::lease_server::Lease;
use atoll_proto::etcdserverpb::{
    compare, request_op, Compare, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest,
    LeaseKeepAliveResponse, LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest,
    LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, PutRequest,
    RequestOp, TxnRequest,
};
use atoll_proto::mvccpb::KeyValue;
use atoll_storage::lease::{
    attachment_key, attachments_range, key_of_attachment, record_key, record_split_keys,
    records_end, records_start, LeaseRecord, LeaseTable,
};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};

/// etcd's `MaxLeaseTTL` (seconds).
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// The shortest TTL granted (seconds): a shorter one is raised to it, as etcd raises it to
/// its `minTTL` (1.5 election timeouts, rounded up: 2 s with etcd's defaults and with
/// Atoll's 1 s election timeout).
pub const MIN_LEASE_TTL: i64 = 2;
/// Keep-alives of one stream in flight at once.
const KEEPALIVE_CONCURRENCY: usize = 256;
/// Ranges one fetch reads at once (a revoke reads every key of its lease).
const FETCH_CONCURRENCY: usize = 32;
/// Revocations of expired leases in flight at once, per store.
const REVOKE_CONCURRENCY: usize = 32;

pub struct LeaseService {
    ctx: Arc<EtcdContext>,
    split: tokio::sync::OnceCell<()>,
    batcher: Arc<KeepAliveBatcher>,
}

impl LeaseService {
    pub fn new(ctx: Arc<EtcdContext>) -> Self {
        LeaseService {
            ctx,
            split: tokio::sync::OnceCell::new(),
            batcher: Arc::default(),
        }
    }

    /// Splits the record space off and into [`atoll_storage::lease::RECORD_SPLITS`] regions
    /// once (the first grant of this process): leases start out owned by several leaders.
    async fn ensure_split(&self) {
        if self.split.initialized() {
            return;
        }
        let mut keys = vec![atoll_keys::SYSTEM_PREFIX.to_vec(), records_start()];
        keys.extend(record_split_keys());
        let client = self.ctx.client.clone();
        let r = self
            .split
            .get_or_try_init(|| async move { client.split(&keys).await.map(|_| ()) })
            .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "splitting the lease records failed; tried again at the next grant");
        }
    }

    async fn grant(&self, r: LeaseGrantRequest) -> Result<LeaseGrantResponse, Status> {
        if r.ttl > MAX_LEASE_TTL {
            return Err(errors::lease_ttl_too_large());
        }
        let ttl = r.ttl.max(MIN_LEASE_TTL);
        self.ensure_split().await;
        let chosen = r.id != 0;
        for _ in 0..8 {
            let id = if chosen {
                r.id
            } else {
                loop {
                    let id = rand::random::<i64>() & i64::MAX;
                    if id != 0 {
                        break id;
                    }
                }
            };
            let key = record_key(id);
            let rec = LeaseRecord {
                ttl,
                remaining_ms: 0,
                expiring: false,
            };
            let txn = TxnRequest {
                compare: vec![Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Create as i32,
                    key: key.clone(),
                    range_end: vec![],
                    target_union: Some(compare::TargetUnion::CreateRevision(0)),
                }],
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: key.clone(),
                        value: rec.encode(),
                        ..Default::default()
                    })),
                }],
                failure: vec![],
            };
            let (_, end) = point(&key);
            let wid = self.ctx.client.write_id().await.map_err(client_error)?;
            let out = self
                .ctx
                .client
                .etcd_txn(&key, &[(key.clone(), end)], &txn, wid)
                .await
                .map_err(client_error)?;
            match out {
                EtcdTxnOutcome::Done(t) if t.succeeded => {
                    let rev = t.header.map_or(0, |h| h.revision);
                    return Ok(LeaseGrantResponse {
                        header: Some(self.ctx.header(rev)),
                        id,
                        ttl,
                        error: String::new(),
                    });
                }
                EtcdTxnOutcome::Done(_) if chosen => return Err(errors::lease_exist()),
                EtcdTxnOutcome::Done(_) => continue,
                EtcdTxnOutcome::Refused(e) => {
                    return Err(Status::new(Code::from(e.code as i32), e.message))
                }
                EtcdTxnOutcome::SpansRegions => continue,
            }
        }
        Err(errors::atoll(
            Code::Unavailable,
            "could not grant a lease: retry",
        ))
    }

    async fn time_to_live(
        &self,
        r: LeaseTimeToLiveRequest,
    ) -> Result<LeaseTimeToLiveResponse, Status> {
        let client = &self.ctx.client;
        let ttl = client
            .lease_time_to_live(&record_key(r.id), r.id)
            .await
            .map_err(client_error)?;
        let rev = self.ctx.pd.tso_high_water() as i64;
        let Some(ttl) = ttl else {
            return Ok(LeaseTimeToLiveResponse {
                header: Some(self.ctx.header(rev)),
                id: r.id,
                ttl: -1,
                granted_ttl: 0,
                keys: vec![],
            });
        };
        let keys = if r.keys {
            let ts = client.tso().await.map_err(client_error)?;
            attached_keys(&self.ctx, r.id, ts, 0)
                .await?
                .into_iter()
                .map(|kv| kv.key)
                .collect()
        } else {
            vec![]
        };
        Ok(LeaseTimeToLiveResponse {
            header: Some(self.ctx.header(rev)),
            id: r.id,
            ttl: ttl.remaining_ms / 1000,
            granted_ttl: ttl.granted,
            keys,
        })
    }

    async fn leases(&self) -> Result<LeaseLeasesResponse, Status> {
        let client = &self.ctx.client;
        let ts = client.tso().await.map_err(client_error)?;
        let (kvs, _) = client
            .etcd_range(&records_start(), &records_end(), ts, 0, false, false)
            .await
            .map_err(client_error)?;
        let leases = kvs
            .iter()
            .filter_map(|kv| {
                let id = atoll_storage::lease::lease_of_record_key(&kv.key)?;
                let rec = LeaseRecord::decode(&kv.value)?;
                (!rec.expiring).then_some(LeaseStatus { id })
            })
            .collect();
        Ok(LeaseLeasesResponse {
            header: Some(self.ctx.header(ts as i64)),
            leases,
        })
    }
}

impl LeaseService {
    /// The answers to a stream of keep-alives: each as soon as the lease's owner renewed it
    /// (several in flight at once; answers may overtake each other, as clients match them by
    /// id). TTL 0: no such lease (or it expired), as etcd answers.
    pub fn keep_alive_stream<S>(
        &self,
        inbound: S,
    ) -> impl tokio_stream::Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send + 'static
    where
        S: tokio_stream::Stream<Item = Result<LeaseKeepAliveRequest, Status>> + Send + 'static,
    {
        let ctx = self.ctx.clone();
        let batcher = self.batcher.clone();
        inbound
            .map(move |r| {
                let (ctx, batcher) = (ctx.clone(), batcher.clone());
                async move {
                    let r = r?;
                    let ttl = batcher.keep_alive(&ctx, r.id).await?;
                    Ok(LeaseKeepAliveResponse {
                        header: Some(ctx.header(ctx.pd.tso_high_water() as i64)),
                        id: r.id,
                        ttl,
                    })
                }
            })
            .buffer_unordered(KEEPALIVE_CONCURRENCY)
    }
}

type Renewal = (i64, tokio::sync::oneshot::Sender<Result<i64, Status>>);

/// Keep-alives of every stream of this store, batched: whatever is queued when a batch can
/// go goes together, one call per region of lease records ([`Client::lease_keep_alive`]).
/// Under load batches grow on their own (at most [`BATCHES_IN_FLIGHT`] are out at once);
/// the queue is bounded (a full queue holds the streams back).
///
/// [`Client::lease_keep_alive`]: atoll_client::Client::lease_keep_alive
#[derive(Default)]
pub struct KeepAliveBatcher {
    tx: std::sync::OnceLock<tokio::sync::mpsc::Sender<Renewal>>,
}

/// Batches of keep-alives out at once, per store.
const BATCHES_IN_FLIGHT: usize = 8;
/// The most keep-alives in one batch.
const BATCH_MAX: usize = 2048;

impl KeepAliveBatcher {
    pub async fn keep_alive(&self, ctx: &Arc<EtcdContext>, id: i64) -> Result<i64, Status> {
        let tx = self.tx.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(64 * 1024);
            tokio::spawn(run_batches(ctx.clone(), rx));
            tx
        });
        let (done, answer) = tokio::sync::oneshot::channel();
        tx.send((id, done))
            .await
            .map_err(|_| errors::atoll(Code::Unavailable, "keep-alives stopped"))?;
        answer
            .await
            .map_err(|_| errors::atoll(Code::Unavailable, "keep-alive dropped"))?
    }
}

async fn run_batches(ctx: Arc<EtcdContext>, mut rx: tokio::sync::mpsc::Receiver<Renewal>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let items: Vec<(Vec<u8>, i64)> =
                batch.iter().map(|(id, _)| (record_key(*id), *id)).collect();
            match ctx.client.lease_keep_alive(&items).await {
                Ok(ttls) => {
                    let ttls: HashMap<i64, i64> = ttls.into_iter().collect();
                    for (id, done) in batch {
                        let _ = done.send(Ok(ttls.get(&id).copied().unwrap_or(0)));
                    }
                }
                Err(e) => {
                    let status = client_error(e);
                    for (_, done) in batch {
                        let _ = done.send(Err(status.clone()));
                    }
                }
            }
            drop(permit);
        });
    }
}

/// A single key as a range `[k, k\0)`.
fn point(k: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut e = k.to_vec();
    e.push(0);
    (k.to_vec(), e)
}

/// The key-values of `ranges` at `ts`, past the locks of transaction `own` (0: none).
pub(crate) async fn fetch_ranges(
    ctx: &EtcdContext,
    ranges: &[(Vec<u8>, Vec<u8>)],
    ts: u64,
    own: u64,
) -> Result<BTreeMap<Vec<u8>, KeyValue>, Status> {
    let mut out = BTreeMap::new();
    for chunk in ranges.chunks(FETCH_CONCURRENCY) {
        let mut reads = Vec::with_capacity(chunk.len());
        for (s, e) in chunk {
            reads.push(fetch_one(ctx, s, e, ts, own));
        }
        for r in futures::future::join_all(reads).await {
            for kv in r.map_err(client_error)? {
                out.insert(kv.key.clone(), kv);
            }
        }
    }
    Ok(out)
}

async fn fetch_one(
    ctx: &EtcdContext,
    start: &[u8],
    end: &[u8],
    ts: u64,
    own: u64,
) -> Result<Vec<KeyValue>, atoll_client::Error> {
    let bypass = if own == 0 { vec![] } else { vec![own] };
    let (kvs, _) = ctx
        .client
        .etcd_range_bypassing(start, end, ts, 0, false, false, bypass)
        .await?;
    Ok(kvs)
}

/// The keys attached to lease `id` at `ts`: those its entries name that still carry it.
async fn attached_keys(
    ctx: &EtcdContext,
    id: i64,
    ts: u64,
    own: u64,
) -> Result<Vec<KeyValue>, Status> {
    let (s, e) = attachments_range(id);
    let entries = fetch_ranges(ctx, &[(s, e)], ts, own).await?;
    let ranges: Vec<_> = entries
        .keys()
        .filter_map(|k| key_of_attachment(id, k).map(point))
        .collect();
    Ok(fetch_ranges(ctx, &ranges, ts, own)
        .await?
        .into_values()
        .filter(|kv| kv.lease == id)
        .collect())
}

/// Everything a revoke of `id` decides on, at `ts`: the record, the attachment entries and
/// the keys they name.
async fn revoke_view(
    ctx: &EtcdContext,
    id: i64,
    ts: u64,
    own: u64,
) -> Result<BTreeMap<Vec<u8>, KeyValue>, Status> {
    let rk = record_key(id);
    let mut seen = fetch_ranges(ctx, &[point(&rk), attachments_range(id)], ts, own).await?;
    let ranges: Vec<_> = seen
        .keys()
        .filter_map(|k| key_of_attachment(id, k).map(point))
        .collect();
    seen.extend(fetch_ranges(ctx, &ranges, ts, own).await?);
    Ok(seen)
}

/// Revokes lease `id`: deletes the keys attached to it, its attachment entries and its
/// record in one transaction; returns the revision of the deletes, `None` if there is no such
/// lease. A concurrent attach or change of an attached key starts it over.
pub async fn revoke(ctx: &EtcdContext, id: i64) -> Result<Option<u64>, Status> {
    let client = &ctx.client;
    let deadline = Instant::now() + client.config().timeout;
    let rk = record_key(id);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        if Instant::now() >= deadline {
            return Err(errors::timeout());
        }
        let opts = atoll_client::TxnOptions {
            try_one_pc: false,
            ..Default::default()
        };
        let mut t = client.begin_with(opts).await.map_err(client_error)?;
        t.allow_system_keys();
        let start = t.start_ts();
        let seen = revoke_view(ctx, id, start, 0).await?;
        if !seen.contains_key(&rk) {
            return Ok(None);
        }
        t.delete(rk.clone()).map_err(client_error)?;
        for (k, kv) in &seen {
            let attached = key_of_attachment(id, k).is_some();
            let carries = !atoll_keys::is_system_key(k) && kv.lease == id;
            if attached || carries {
                t.delete(k.clone()).map_err(client_error)?;
            }
        }
        match t.prewrite().await {
            Ok(_) => {}
            Err(atoll_client::Error::WriteConflict { .. }) => {
                backoff(attempt).await;
                continue;
            }
            Err(e) => return Err(client_error(e)),
        }
        let seen = &seen;
        let committed = t
            .commit_prewritten_checked(|commit_ts| async move {
                let now = revoke_view(ctx, id, commit_ts, start)
                    .await
                    .map_err(|s| atoll_client::Error::Server(s.message().to_string()))?;
                Ok(same_versions(seen, &now))
            })
            .await
            .map_err(client_error)?;
        match committed {
            Some(ts) => return Ok(Some(ts)),
            None => backoff(attempt).await,
        }
    }
}

/// Revokes the leases this store's timers marked expiring, at most [`REVOKE_CONCURRENCY`] at
/// once (the owner marks at most [`atoll_storage::lease::EXPIRE_PER_TICK`] a tick). Runs
/// until `stop`.
pub async fn run_expiry(
    ctx: Arc<EtcdContext>,
    table: Arc<LeaseTable>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let running: Arc<parking_lot::Mutex<HashSet<i64>>> = Arc::default();
    let mut retry_at: HashMap<i64, Instant> = HashMap::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(REVOKE_CONCURRENCY));
    loop {
        let ids = tokio::select! {
            ids = table.expiring(Duration::from_secs(1)) => ids,
            _ = stop.changed() => return,
        };
        let now = Instant::now();
        let live: HashSet<i64> = ids.iter().copied().collect();
        retry_at.retain(|id, _| live.contains(id));
        for id in ids {
            if running.lock().contains(&id) || retry_at.get(&id).is_some_and(|t| *t > now) {
                continue;
            }
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                break;
            };
            running.lock().insert(id);
            retry_at.insert(id, now + Duration::from_secs(1));
            let (ctx, running) = (ctx.clone(), running.clone());
            tokio::spawn(async move {
                match revoke(&ctx, id).await {
                    Ok(rev) => {
                        tracing::debug!(lease = id, revision = ?rev, "expired lease revoked")
                    }
                    Err(e) => {
                        tracing::debug!(lease = id, error = %e, "revoking an expired lease failed; retried")
                    }
                }
                running.lock().remove(&id);
                drop(permit);
            });
        }
        // Due leases the owner could not mark: read their records through the client, which
        // resolves a lock an abandoned transaction left there.
        for id in table.stuck() {
            if let Ok(ts) = ctx.client.tso().await {
                let _ = fetch_ranges(&ctx, &[record_range(id)], ts, 0).await;
            }
        }
        // Nothing new to start: wait a little before looking again.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        req: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        // etcd checks no permission to grant, but refuses a bad token.
        self.ctx.auth.authorize(&req, &[]).await?;
        Ok(Response::new(self.grant(req.into_inner()).await?))
    }

    async fn lease_revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        // etcd's checkLeasePuts: write on every key attached to the lease.
        let caller = self.ctx.auth.authorize(&req, &[]).await?;
        let id = req.get_ref().id;
        check_lease_keys(&self.ctx, &caller, id, Access::Write).await?;
        match revoke(&self.ctx, id).await? {
            Some(rev) => Ok(Response::new(LeaseRevokeResponse {
                header: Some(self.ctx.header(rev as i64)),
            })),
            None => Err(errors::lease_not_found()),
        }
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    /// Each request answered as soon as the lease's owner renewed it (several in flight at
    /// once; answers may overtake each other, as clients match them by id). TTL 0: no such
    /// lease (or it expired), as etcd answers.
    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        self.ctx.auth.authorize(&req, &[]).await?;
        Ok(Response::new(Box::pin(
            self.keep_alive_stream(req.into_inner()),
        )))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        // etcd's checkLeaseTimeToLive: a user, with read on every key attached to the lease.
        let caller = self.ctx.auth.authorize(&req, &[Need::User]).await?;
        check_lease_keys(&self.ctx, &caller, req.get_ref().id, Access::Read).await?;
        Ok(Response::new(self.time_to_live(req.into_inner()).await?))
    }

    async fn lease_leases(
        &self,
        req: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        self.ctx.auth.authorize(&req, &[]).await?;
        Ok(Response::new(self.leases().await?))
    }
}

/// etcd's `checkLeasePuts` (`access` Write) and `checkLeaseTimeToLive` (Read): `caller` needs
/// `access` to every key attached to lease `id`, unless it is root (or a store, or auth is
/// off). A lease that does not exist has no keys.
pub(crate) async fn check_lease_keys(
    ctx: &EtcdContext,
    caller: &Caller,
    id: i64,
    access: Access,
) -> Result<(), Status> {
    match caller {
        Caller::Open | Caller::Store => return Ok(()),
        Caller::User(u) if ctx.auth.state().is_root(u) => return Ok(()),
        _ => {}
    }
    let ts = ctx.client.tso().await.map_err(client_error)?;
    let needs: Vec<Need> = attached_keys(ctx, id, ts, 0)
        .await?
        .into_iter()
        .map(|kv| Need::Keys {
            access,
            key: kv.key,
            end: vec![],
        })
        .collect();
    ctx.auth.check_fresh(caller, &needs).await
}

/// The lease ids that puts of `txn` (any branch, nested txns too) attach keys to.
pub(crate) fn put_leases(txn: &TxnRequest, out: &mut Vec<i64>) {
    for op in txn.success.iter().chain(txn.failure.iter()) {
        match &op.request {
            Some(request_op::Request::RequestPut(p))
                if p.lease != 0 && !p.ignore_lease && !out.contains(&p.lease) =>
            {
                out.push(p.lease)
            }
            Some(request_op::Request::RequestTxn(t)) => put_leases(t, out),
            _ => {}
        }
    }
}

/// Whether lease `id` exists and is not expiring in a fetched view.
pub(crate) fn lease_live(seen: &BTreeMap<Vec<u8>, KeyValue>, id: i64) -> bool {
    seen.get(&record_key(id))
        .and_then(|kv| LeaseRecord::decode(&kv.value))
        .is_some_and(|r| !r.expiring)
}

/// The record key of lease `id` as a range to fetch.
pub(crate) fn record_range(id: i64) -> (Vec<u8>, Vec<u8>) {
    point(&record_key(id))
}

/// The attachment entry a put of `key` with lease `id` writes.
pub(crate) fn attachment(id: i64, key: &[u8]) -> Vec<u8> {
    attachment_key(id, key)
}
