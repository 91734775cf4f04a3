//! Plain reads: get, batch get and scan at a timestamp (0 = latest), linearizable.

use crate::storage::*;
use atoll_engine::KvEngine;
use atoll_proto::kvrpcpb::*;
use atoll_txn::MvccReader;
use tonic::Status;

impl<E: KvEngine> Storage<E> {
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
}
