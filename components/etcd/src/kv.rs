//! etcd's KV service over Atoll's regions. Revisions are PD timestamps (docs/etcd.md):
//!
//! - **Range** reads at a fresh timestamp (or the requested revision) across every region of
//!   its range, in key order, through [`Client::etcd_range`]; etcd's options are applied by
//!   [`eval::finish_range`]. Its header revision is the fresh timestamp: at least every
//!   revision committed before the call, as etcd's current revision is.
//! - **Put**, **DeleteRange** and **Txn** travel as one etcd txn. One that touches a single
//!   region runs there atomically at one revision (its commit timestamp), serializable with
//!   every other write ([`Client::etcd_txn`]); a read-only txn runs here, over reads made at
//!   one fresh timestamp, whatever regions it reads. A txn that writes and spans regions runs
//!   as a Percolator transaction with a validation read at its commit timestamp
//!   (`multi_region_txn`).
//! - **Compact** moves PD's GC safe point: reads below it answer etcd's "compacted".
//!
//! [`Client::etcd_range`]: atoll_client::Client::etcd_range
//! [`Client::etcd_txn`]: atoll_client::Client::etcd_txn

use crate::auth::{self, perm::Access, Need};
use crate::context::EtcdContext;
use crate::errors;
use atoll_client::etcd::EtcdTxnOutcome;
use atoll_proto::etcdserverpb::kv_server::Kv;
use atoll_proto::etcdserverpb::range_request::SortTarget;
use atoll_proto::etcdserverpb::{
    request_op, response_op, CompactionRequest, CompactionResponse, DeleteRangeRequest,
    DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, RangeStreamResponse,
    RequestOp, TxnRequest, TxnResponse,
};
use atoll_proto::mvccpb::KeyValue;
use atoll_storage::etcd::eval::{self, EtcdError, FetchedView, KeyRange};
use prost::Message;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

/// Key-values per message of a RangeStream.
const STREAM_CHUNK: usize = 1000;
/// How long a physical Compact waits for the stores' GC before failing.
const PHYSICAL_COMPACT_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;
/// etcd's default `--max-request-bytes` (1.5 MiB).
pub const MAX_REQUEST_BYTES: usize = 1536 * 1024;

pub struct KvService {
    ctx: Arc<EtcdContext>,
}

impl KvService {
    pub fn new(ctx: Arc<EtcdContext>) -> Self {
        KvService { ctx }
    }
}

fn status(e: EtcdError) -> Status {
    Status::new(e.code, e.message)
}

/// A client error as the status an etcd client acts on.
pub(crate) fn client_error(e: atoll_client::Error) -> Status {
    use atoll_client::Error as E;
    match e {
        E::Timeout(..) => errors::timeout(),
        // The write may or may not have happened: etcd's answer for that.
        E::Undetermined(_) => errors::timeout(),
        E::InvalidArgument(m) => errors::atoll(Code::InvalidArgument, m),
        E::Pd(e) => errors::from_pd(&e),
        E::Auth(code, m) => Status::new(code, m),
        other => errors::atoll(Code::Unknown, other),
    }
}

/// A user request naming a key of the system key space (Atoll's own records).
fn reserved_key() -> Status {
    errors::atoll(
        Code::InvalidArgument,
        "key is in the reserved key space (from \"\\xff\\xff\\xff\\xffatoll/\" up)",
    )
}

fn check_size(m: &impl Message) -> Result<(), Status> {
    if m.encoded_len() > MAX_REQUEST_BYTES {
        return Err(errors::request_too_large());
    }
    Ok(())
}

fn single_op(request: request_op::Request) -> TxnRequest {
    TxnRequest {
        compare: vec![],
        success: vec![RequestOp {
            request: Some(request),
        }],
        failure: vec![],
    }
}

impl KvService {
    /// A fresh timestamp: the revision every read without one reads at.
    async fn now(&self) -> Result<u64, Status> {
        self.ctx.client.tso().await.map_err(client_error)
    }

    /// The timestamp a read of `revision` (0: the latest) reads at, and the current revision.
    async fn read_ts(&self, revision: i64) -> Result<(u64, u64), Status> {
        let now = self.now().await?;
        if revision == 0 {
            return Ok((now, now));
        }
        if revision < 0 || revision as u64 > now {
            return Err(status(eval::ERR_FUTURE_REV));
        }
        let compacted = self
            .ctx
            .pd
            .get_gc_safe_point()
            .await
            .map_err(|e| errors::from_pd(&e))?;
        if (revision as u64) < compacted {
            return Err(status(eval::ERR_COMPACTED));
        }
        Ok((revision as u64, now))
    }

    /// Checks every key and value of a txn against Atoll's limits.
    fn check_limits(&self, t: &TxnRequest) -> Result<(), Status> {
        let cfg = self.ctx.client.config();
        let key = |k: &[u8]| {
            if atoll_keys::is_system_key(k) {
                return Err(reserved_key());
            }
            if k.len() > cfg.max_key_size {
                return Err(errors::atoll(
                    Code::InvalidArgument,
                    format!(
                        "key of {} bytes exceeds the limit of {} bytes",
                        k.len(),
                        cfg.max_key_size
                    ),
                ));
            }
            Ok(())
        };
        for c in &t.compare {
            key(&c.key)?;
        }
        for op in t.success.iter().chain(t.failure.iter()) {
            match &op.request {
                Some(request_op::Request::RequestPut(p)) => {
                    key(&p.key)?;
                    if p.value.len() > cfg.max_value_size {
                        return Err(errors::atoll(
                            Code::InvalidArgument,
                            format!(
                                "value of {} bytes exceeds the limit of {} bytes",
                                p.value.len(),
                                cfg.max_value_size
                            ),
                        ));
                    }
                }
                // A range from a system key is empty (cut at the system key space); the key
                // alone is refused.
                Some(request_op::Request::RequestRange(r))
                    if !r.range_end.is_empty() && atoll_keys::is_system_key(&r.key) => {}
                Some(request_op::Request::RequestRange(r)) => key(&r.key)?,
                Some(request_op::Request::RequestDeleteRange(d)) => key(&d.key)?,
                Some(request_op::Request::RequestTxn(t)) => self.check_limits(t)?,
                None => {}
            }
        }
        Ok(())
    }

    /// Runs a checked txn: read-only ones here at one timestamp, the rest on their region.
    async fn txn(&self, txn: TxnRequest) -> Result<TxnResponse, Status> {
        if eval::txn_is_read_only(&txn) {
            return self.read_only_txn(&txn).await;
        }
        let (mut reads, mut writes) = (vec![], vec![]);
        eval::txn_ranges(&txn, &mut reads, &mut writes);
        let ranges: Vec<(Vec<u8>, Vec<u8>)> = reads
            .iter()
            .chain(writes.iter())
            .filter(|r| !r.is_empty())
            .map(KeyRange::bounds)
            .collect();
        let Some(first) = ranges.iter().map(|(s, _)| s.clone()).min() else {
            // Only empty ranges written: nothing can be written.
            return self.read_only_txn(&txn).await;
        };
        let mut leases = vec![];
        crate::lease::put_leases(&txn, &mut leases);
        if !leases.is_empty() {
            // The lease's record and attachment entries are elsewhere: a transaction.
            return self.multi_region_txn(&txn, &reads, &writes, &leases).await;
        }
        let id = self.ctx.client.write_id().await.map_err(client_error)?;
        match self
            .ctx
            .client
            .etcd_txn(&first, &ranges, &txn, id)
            .await
            .map_err(client_error)?
        {
            EtcdTxnOutcome::Done(t) => Ok(t),
            EtcdTxnOutcome::Refused(e) => Err(Status::new(Code::from(e.code as i32), e.message)),
            EtcdTxnOutcome::SpansRegions => self.multi_region_txn(&txn, &reads, &writes, &[]).await,
        }
    }

    /// The keys of `ranges` at `ts`, ignoring the locks of transaction `own` (0: none).
    async fn fetch(
        &self,
        ranges: &[&KeyRange],
        ts: u64,
        own: u64,
    ) -> Result<BTreeMap<Vec<u8>, KeyValue>, Status> {
        let bounds: Vec<(Vec<u8>, Vec<u8>)> = ranges
            .iter()
            .filter(|r| !r.is_empty())
            .map(|r| r.bounds())
            .collect();
        crate::lease::fetch_ranges(&self.ctx, &bounds, ts, own).await
    }

    /// A txn that writes keys of several regions: a Percolator transaction made serializable.
    /// Everything it may read or write is read at its start timestamp and the txn decided on
    /// that; its writes are prewritten (a key written since the start conflicts); then, at
    /// the commit timestamp and before the commit point, everything is read again — past its
    /// own locks — and must be unchanged (a new key in a range, a changed compared key: the
    /// txn starts over). The reads at the commit timestamp hold off later one-phase commits
    /// below it and meet the locks of two-phase ones, so nothing it read changes between its
    /// decision and its revision: the commit timestamp.
    ///
    /// `leases`: the leases its puts attach keys to. Their records are read with the rest (a
    /// lease that does not exist or is expiring refuses the txn; one revoked or expiring by
    /// the commit timestamp starts it over), and each leased put also writes the key's
    /// attachment entry (lease.rs).
    async fn multi_region_txn(
        &self,
        txn: &TxnRequest,
        reads: &[KeyRange],
        writes: &[KeyRange],
        leases: &[i64],
    ) -> Result<TxnResponse, Status> {
        let client = &self.ctx.client;
        let records: Vec<KeyRange> = leases
            .iter()
            .map(|id| {
                let (s, _) = crate::lease::record_range(*id);
                KeyRange::single(&s)
            })
            .collect();
        let all: Vec<&KeyRange> = reads
            .iter()
            .chain(writes.iter())
            .chain(records.iter())
            .collect();
        let deadline = std::time::Instant::now() + client.config().timeout;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if std::time::Instant::now() >= deadline {
                return Err(errors::timeout());
            }
            let opts = atoll_client::TxnOptions {
                try_one_pc: false,
                ..Default::default()
            };
            let mut t = client.begin_with(opts).await.map_err(client_error)?;
            if !leases.is_empty() {
                // The attachment entries are system keys.
                t.allow_system_keys();
            }
            let start = t.start_ts();
            let seen = self.fetch(&all, start, 0).await?;
            let mut view = FetchedView::default();
            for kv in seen.values() {
                view.insert(kv.clone());
            }
            let live = |id: i64| crate::lease::lease_live(&seen, id);
            let decided = match eval::execute_txn(&mut view, txn, 0, &live) {
                Ok(Ok(d)) => d,
                Ok(Err(e)) => return Err(status(e)),
                Err(_) => {
                    return Err(errors::atoll(
                        Code::Internal,
                        "txn over fetched keys failed",
                    ))
                }
            };
            if decided.writes.is_empty() {
                // The branch taken writes nothing: a read at the start timestamp.
                let mut resp = decided.resp;
                resp.header = Some(eval_header(start));
                return Ok(resp);
            }
            for w in &decided.writes {
                let r = match &w.value {
                    Some(v) => t.put_with_lease(w.key.clone(), v.clone(), w.lease),
                    None => t.delete(w.key.clone()),
                };
                r.map_err(client_error)?;
                if w.value.is_some() && leases.contains(&w.lease) {
                    t.put_with_lease(crate::lease::attachment(w.lease, &w.key), vec![], 0)
                        .map_err(client_error)?;
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
            let all = &all;
            let seen = &seen;
            let committed = t
                .commit_prewritten_checked(|commit_ts| async move {
                    let now = self
                        .fetch(all, commit_ts, start)
                        .await
                        .map_err(|s| atoll_client::Error::Server(s.message().to_string()))?;
                    Ok(same_versions(seen, &now))
                })
                .await
                .map_err(client_error)?;
            let Some(commit_ts) = committed else {
                backoff(attempt).await;
                continue;
            };
            // The answer, with the revision the writes got.
            let mut view = FetchedView::default();
            for kv in seen.values() {
                view.insert(kv.clone());
            }
            let live = |id: i64| crate::lease::lease_live(seen, id);
            let mut resp = match eval::execute_txn(&mut view, txn, commit_ts as i64, &live) {
                Ok(Ok(d)) => d.resp,
                _ => {
                    return Err(errors::atoll(
                        Code::Internal,
                        "txn answer over fetched keys failed",
                    ))
                }
            };
            resp.header = Some(eval_header(commit_ts));
            return Ok(resp);
        }
    }

    /// A txn that writes nothing: every range it may read, fetched at one fresh timestamp,
    /// then decided here.
    async fn read_only_txn(&self, txn: &TxnRequest) -> Result<TxnResponse, Status> {
        let ts = self.now().await?;
        let (mut reads, mut writes) = (vec![], vec![]);
        eval::txn_ranges(txn, &mut reads, &mut writes);
        let reads: Vec<&KeyRange> = reads.iter().collect();
        let mut view = FetchedView::default();
        for kv in self.fetch(&reads, ts, 0).await?.into_values() {
            view.insert(kv);
        }
        match eval::execute_txn(&mut view, txn, ts as i64, &|_| false) {
            Ok(Ok(mut out)) => {
                out.resp.header = Some(eval_header(ts));
                Ok(out.resp)
            }
            Ok(Err(e)) => Err(status(e)),
            Err(_) => Err(errors::atoll(
                Code::Internal,
                "read-only txn over fetched keys failed",
            )),
        }
    }

    /// Fills the headers of a txn answer: the whole answer's with this store's header; the
    /// nested answers' with the revision alone, as etcd leaves them.
    fn fill_headers(&self, t: &mut TxnResponse, revision: i64) {
        t.header = Some(self.ctx.header(revision));
        fill_nested(t, revision);
    }

    async fn single(
        &self,
        request: request_op::Request,
    ) -> Result<(response_op::Response, i64), Status> {
        let t = single_op(request);
        self.check_limits(&t)?;
        let mut resp = self.txn(t).await?;
        let revision = resp.header.as_ref().map_or(0, |h| h.revision);
        let response = resp
            .responses
            .pop()
            .and_then(|r| r.response)
            .ok_or_else(|| errors::atoll(Code::Internal, "a txn of one operation answered none"))?;
        Ok((response, revision))
    }
}

fn fill_nested(t: &mut TxnResponse, revision: i64) {
    let h = || Some(eval_header(revision as u64));
    for r in &mut t.responses {
        match &mut r.response {
            Some(response_op::Response::ResponseRange(x)) => x.header = h(),
            Some(response_op::Response::ResponsePut(x)) => x.header = h(),
            Some(response_op::Response::ResponseDeleteRange(x)) => x.header = h(),
            Some(response_op::Response::ResponseTxn(x)) => {
                x.header = h();
                fill_nested(x, revision);
            }
            None => {}
        }
    }
}

/// Whether two reads saw the same versions of the same keys.
pub(crate) fn same_versions(
    a: &BTreeMap<Vec<u8>, KeyValue>,
    b: &BTreeMap<Vec<u8>, KeyValue>,
) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b.iter())
            .all(|((ka, va), (kb, vb))| ka == kb && va.mod_revision == vb.mod_revision)
}

/// A short randomized pause before a conflicted txn starts over.
pub(crate) async fn backoff(attempt: u32) {
    let ms = (1u64 << attempt.min(6)).min(50) + rand::random::<u64>() % 10;
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

fn eval_header(ts: u64) -> atoll_proto::etcdserverpb::ResponseHeader {
    atoll_proto::etcdserverpb::ResponseHeader {
        revision: ts as i64,
        ..Default::default()
    }
}

impl KvService {
    async fn do_range(&self, r: RangeRequest) -> Result<RangeResponse, Status> {
        eval::check_range_request(&r).map_err(status)?;
        if r.range_end.is_empty() && atoll_keys::is_system_key(&r.key) {
            return Err(reserved_key());
        }
        check_size(&r)?;
        let (ts, now) = self.read_ts(r.revision).await?;
        let range = KeyRange::from_etcd(&r.key, &r.range_end);
        let (kvs, count) = if range.is_empty() {
            (vec![], 0)
        } else {
            let (s, e) = range.bounds();
            // Values are needed to sort by value, even for a keys-only answer.
            let keys_only = r.keys_only && r.sort_target() != SortTarget::Value;
            self.ctx
                .client
                .etcd_range(
                    &s,
                    &e,
                    ts,
                    eval::range_fetch_limit(&r),
                    keys_only,
                    r.count_only,
                )
                .await
                .map_err(client_error)?
        };
        let mut resp = eval::finish_range(&r, kvs, count);
        resp.header = Some(self.ctx.header(now as i64));
        Ok(resp)
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let mut needs = vec![];
        auth::check::range(req.get_ref(), &mut needs);
        self.ctx.auth.authorize(&req, &needs).await?;
        Ok(Response::new(self.do_range(req.into_inner()).await?))
    }

    type RangeStreamStream =
        Pin<Box<dyn Stream<Item = Result<RangeStreamResponse, Status>> + Send + 'static>>;

    /// The Range answer in chunks of key-values; header, `more` and `count` on the last.
    async fn range_stream(
        &self,
        req: Request<RangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        let mut needs = vec![];
        auth::check::range(req.get_ref(), &mut needs);
        self.ctx.auth.authorize(&req, &needs).await?;
        let mut whole = self.do_range(req.into_inner()).await?;
        let mut kvs = std::mem::take(&mut whole.kvs);
        let mut chunks = vec![];
        while kvs.len() > STREAM_CHUNK {
            let rest = kvs.split_off(STREAM_CHUNK);
            chunks.push(RangeResponse {
                kvs,
                ..Default::default()
            });
            kvs = rest;
        }
        whole.kvs = kvs;
        chunks.push(whole);
        let items = chunks.into_iter().map(|c| {
            Ok(RangeStreamResponse {
                range_response: Some(c),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let mut needs = vec![];
        auth::check::put(req.get_ref(), &mut needs);
        let caller = self.ctx.auth.authorize(&req, &needs).await?;
        let p = req.into_inner();
        if p.lease != 0 && !p.ignore_lease {
            crate::lease::check_lease_keys(&self.ctx, &caller, p.lease, Access::Write).await?;
        }
        eval::check_put_request(&p).map_err(status)?;
        check_size(&p)?;
        match self.single(request_op::Request::RequestPut(p)).await? {
            (response_op::Response::ResponsePut(mut r), rev) => {
                r.header = Some(self.ctx.header(rev));
                Ok(Response::new(r))
            }
            _ => Err(errors::atoll(
                Code::Internal,
                "a put answered as something else",
            )),
        }
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let mut needs = vec![];
        auth::check::delete_range(req.get_ref(), &mut needs);
        self.ctx.auth.authorize(&req, &needs).await?;
        let d = req.into_inner();
        eval::check_delete_request(&d).map_err(status)?;
        check_size(&d)?;
        match self
            .single(request_op::Request::RequestDeleteRange(d))
            .await?
        {
            (response_op::Response::ResponseDeleteRange(mut r), rev) => {
                r.header = Some(self.ctx.header(rev));
                Ok(Response::new(r))
            }
            _ => Err(errors::atoll(
                Code::Internal,
                "a delete answered as something else",
            )),
        }
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let mut needs = vec![];
        auth::check::txn(req.get_ref(), &mut needs);
        let caller = self.ctx.auth.authorize(&req, &needs).await?;
        let t = req.into_inner();
        let mut leases = vec![];
        crate::lease::put_leases(&t, &mut leases);
        for id in leases {
            crate::lease::check_lease_keys(&self.ctx, &caller, id, Access::Write).await?;
        }
        check_size(&t)?;
        eval::check_txn_request(&t, MAX_TXN_OPS).map_err(status)?;
        self.check_limits(&t)?;
        let mut resp = KvService::txn(self, t).await?;
        let revision = resp.header.as_ref().map_or(0, |h| h.revision);
        self.fill_headers(&mut resp, revision);
        Ok(Response::new(resp))
    }

    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        // etcd checks nothing here; moving the safe point drops history for everyone: root.
        self.ctx.auth.authorize(&req, &[Need::Admin]).await?;
        let c = req.into_inner();
        let now = self.now().await?;
        if c.revision <= 0 || c.revision as u64 > now {
            return Err(status(eval::ERR_FUTURE_REV));
        }
        let pd = &self.ctx.pd;
        let current = pd
            .get_gc_safe_point()
            .await
            .map_err(|e| errors::from_pd(&e))?;
        if (c.revision as u64) <= current {
            return Err(status(eval::ERR_COMPACTED));
        }
        pd.update_gc_safe_point(c.revision as u64)
            .await
            .map_err(|e| errors::from_pd(&e))?;
        if c.physical {
            // etcd answers a physical compaction once its backend dropped the old revisions:
            // here, once every store that is up has run GC at or above the new safe point.
            self.ctx
                .client
                .wait_gc_done(c.revision as u64, PHYSICAL_COMPACT_WAIT)
                .await
                .map_err(client_error)?;
        }
        Ok(Response::new(CompactionResponse {
            header: Some(self.ctx.header(now as i64)),
        }))
    }
}
