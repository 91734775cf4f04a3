//! Plain writes, committed in one phase on the region leader: put, batch put, delete,
//! delete-range, compare-and-swap; and splits on request.

use crate::storage::*;
use atoll_engine::KvEngine;
use atoll_proto::kvrpcpb::*;
use atoll_raftstore::RegionId;
use atoll_txn::{MvccReader, MvccTxn, TxnCommitRecord};
use std::collections::HashMap;
use tonic::Status;

impl<E: KvEngine> Storage<E> {
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
        let latch = self.latches.acquire(&keys).await;
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
            self.commit_wait(commit_ts, start_ts).await?;
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
        let commit_ts = self.one_pc_commit_ts(start_ts, newest, true).await?;
        mem.set_commit_ts(commit_ts);
        let mut txn = MvccTxn::new(start_ts);
        for (k, v) in writes {
            atoll_txn::plain_write(&mut txn, &reader, &k, v, 0, commit_ts)?;
        }
        fail::fail_point!(FP_BEFORE_PLAIN_WRITE, |_| Err(abort(
            "failpoint: plain write refused"
        )));
        let (proposed, waited) = tokio::join!(
            self.propose(ctx, &snap.region, txn.into_modifies(), (latch, mem)),
            self.commit_wait(commit_ts, start_ts)
        );
        proposed?;
        waited?;
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
            .split_async(
                RegionId(ctx.region_id),
                ctx.region_epoch.unwrap_or_default(),
                keys,
            )
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
}
