//! etcd's KV on one region: the leader's side of the etcd API. The etcd layer (`atoll-etcd`)
//! routes each request by key; a Range reaches every region of its range
//! ([`Storage::etcd_range`]), a Put, DeleteRange or Txn whose keys lie in one region runs
//! there as one atomic command at one revision ([`Storage::etcd_txn`], over
//! [`Storage::atomic`]). [`eval`] holds etcd's semantics, independent of where the keys are.

pub mod eval;

use crate::atomic::AtomicWrite;
use crate::storage::*;
use atoll_engine::{KvEngine, Snapshot};
use atoll_proto::kvrpcpb::*;
use atoll_proto::mvccpb::KeyValue;
use atoll_proto::{etcdserverpb, metapb};
use atoll_txn::{KeyMeta, MvccReader};
use eval::{EtcdError, KeyRange, View};
use tonic::Status;

/// etcd's key-value from a version and its metadata (revisions are timestamps).
pub fn key_value(key: Vec<u8>, value: Vec<u8>, meta: &KeyMeta) -> KeyValue {
    KeyValue {
        key,
        create_revision: meta.create_ts as i64,
        mod_revision: meta.mod_ts as i64,
        version: meta.version as i64,
        value,
        lease: meta.lease as i64,
    }
}

/// A region's keys at a timestamp, as an etcd view.
pub struct MvccView<'a, S: Snapshot> {
    pub reader: &'a MvccReader<S>,
    pub ts: u64,
    pub bypass_locks: &'a [u64],
}

impl<S: Snapshot> View for MvccView<'_, S> {
    fn range(&mut self, r: &KeyRange) -> Result<Vec<KeyValue>, Fail> {
        if r.is_empty() {
            return Ok(vec![]);
        }
        let (start, end) = r.bounds();
        Ok(self
            .reader
            .scan_with_meta(&start, &end, 0, self.ts, false, false, self.bypass_locks)?
            .into_iter()
            .map(|(k, v, meta)| key_value(k, v, &meta))
            .collect())
    }
}

fn etcd_error(e: EtcdError) -> atoll_proto::kvrpcpb::EtcdError {
    atoll_proto::kvrpcpb::EtcdError {
        code: e.code as u32,
        message: e.message.to_string(),
    }
}

/// `[start, end)` clipped to the region; `None` if they do not meet.
fn clip(start: &[u8], end: &[u8], r: &metapb::Region) -> Option<(Vec<u8>, Vec<u8>)> {
    let s = start.max(r.start_key.as_slice()).to_vec();
    let e = match (end.is_empty(), r.end_key.is_empty()) {
        (true, _) => r.end_key.clone(),
        (false, true) => end.to_vec(),
        (false, false) => end.min(r.end_key.as_slice()).to_vec(),
    };
    (e.is_empty() || s < e).then_some((s, e))
}

impl<E: KvEngine> Storage<E> {
    /// The live keys of a range at a timestamp, clipped to the region, with etcd's metadata
    /// and the count of every key of the clipped range.
    pub async fn etcd_range(&self, req: EtcdRangeRequest) -> RespResult<EtcdRangeResponse> {
        let ctx = self.check_ctx(&req.context)?;
        if req.start_key.is_empty() {
            return Err(Status::invalid_argument("etcd range without a start key"));
        }
        if req.version == 0 {
            return Err(Status::invalid_argument("etcd range without a version"));
        }
        let mut resp = EtcdRangeResponse::default();
        let r: Result<(Vec<KeyValue>, u64), Fail> = async {
            let snap = self
                .read_snapshot(
                    &ctx,
                    req.version,
                    None,
                    Some((&req.start_key, &req.end_key)),
                )
                .await?;
            let region = &snap.region;
            // The epoch matched, so the caller's view of the region is current: the range
            // starts in it (and is clipped at its end, where the caller goes on).
            if !atoll_keys::in_range(&req.start_key, &region.start_key, &region.end_key) {
                return Err(key_not_in_region(&req.start_key, region));
            }
            let Some((start, end)) = clip(&req.start_key, &req.end_key, region) else {
                return Ok((vec![], 0));
            };
            let reader = MvccReader::new(snap.snap);
            let bypass = &ctx.resolved_locks;
            if req.count_only {
                return Ok((vec![], reader.count(&start, &end, req.version, bypass)?));
            }
            let kvs: Vec<KeyValue> = reader
                .scan_with_meta(
                    &start,
                    &end,
                    req.limit as usize,
                    req.version,
                    req.keys_only,
                    false,
                    bypass,
                )?
                .into_iter()
                .map(|(k, v, meta)| key_value(k, v, &meta))
                .collect();
            let count = if req.limit == 0 || (kvs.len() as u64) < req.limit {
                kvs.len() as u64
            } else {
                reader.count(&start, &end, req.version, bypass)?
            };
            Ok((kvs, count))
        }
        .await;
        match r {
            Ok((kvs, count)) => {
                resp.kvs = kvs;
                resp.count = count;
            }
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    /// An etcd Put, DeleteRange or Txn on one region, atomically at one revision (see
    /// [`Storage::atomic`]). No lease exists yet: a put with a lease is refused with etcd's
    /// "requested lease not found".
    pub async fn etcd_txn(&self, req: EtcdTxnRequest) -> RespResult<EtcdTxnResponse> {
        let ctx = self.check_ctx(&req.context)?;
        let txn = req
            .txn
            .ok_or_else(|| Status::invalid_argument("etcd txn request without a txn"))?;
        if let Err(e) = eval::check_txn_request(&txn, usize::MAX) {
            return Err(Status::invalid_argument(e.message));
        }
        for op in txn.success.iter().chain(txn.failure.iter()) {
            if let Some(etcdserverpb::request_op::Request::RequestPut(p)) = &op.request {
                self.check_key(&p.key)?;
                self.check_value(&p.value)?;
            }
        }
        let (mut reads, mut writes) = (vec![], vec![]);
        eval::txn_ranges(&txn, &mut reads, &mut writes);
        let keys: Vec<Vec<u8>> = writes
            .iter()
            .filter(|w| w.end == eval::RangeEnd::Single)
            .map(|w| w.start.clone())
            .collect();
        let ranges: Vec<(Vec<u8>, Vec<u8>)> = reads
            .iter()
            .chain(writes.iter())
            .filter(|r| !r.is_empty())
            .map(KeyRange::bounds)
            .collect();
        let mut resp = EtcdTxnResponse::default();
        let r = self
            .atomic(&ctx, req.start_version, &keys, &ranges, |view| {
                let mut v = MvccView {
                    reader: &view.reader,
                    ts: view.ts,
                    bypass_locks: view.bypass_locks,
                };
                match eval::execute_txn(&mut v, &txn, view.ts as i64, &|_| false)? {
                    Ok(out) => {
                        let writes = out
                            .writes
                            .into_iter()
                            .map(|w| AtomicWrite {
                                key: w.key,
                                value: w.value,
                                lease: w.lease as u64,
                            })
                            .collect();
                        Ok((writes, Ok(out.resp)))
                    }
                    Err(e) => Ok((vec![], Err(e))),
                }
            })
            .await;
        match r {
            Ok(done) => match done.out {
                Ok(mut t) => {
                    t.header = Some(etcdserverpb::ResponseHeader {
                        revision: done.revision as i64,
                        ..Default::default()
                    });
                    resp.txn = Some(t);
                }
                Err(e) => resp.etcd_error = Some(etcd_error(e)),
            },
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }
}
