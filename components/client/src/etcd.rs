//! The region-level calls of the etcd API: a range read at a timestamp across the regions of
//! a key range, and an etcd txn (Put, DeleteRange and Txn travel as txns) on the one region
//! holding everything it touches. The etcd layer (`atoll-etcd`) builds etcd's answers on
//! these; routing, region errors and lock resolution are handled here as for every call.

use crate::{lock_resolver, Client, Error, Locate, Result};
use atoll_proto::etcdserverpb::TxnResponse;
use atoll_proto::kvrpcpb;
use atoll_proto::metapb;
use atoll_proto::mvccpb::KeyValue;

/// What an etcd txn sent to one region came back with.
#[derive(Debug)]
pub enum EtcdTxnOutcome {
    /// Done (or decided without writing): etcd's answer, its header revision set.
    Done(TxnResponse),
    /// etcd refused it: the gRPC code and etcd's message.
    Refused(kvrpcpb::EtcdError),
    /// What it touches is not (or no longer) in one region.
    SpansRegions,
}

/// The end of `[.., end)` (empty: unbounded) clipped to `region`'s end.
pub fn clip_end(end: &[u8], region: &metapb::Region) -> Vec<u8> {
    if region.end_key.is_empty() || (!end.is_empty() && end < region.end_key.as_slice()) {
        end.to_vec()
    } else {
        region.end_key.clone()
    }
}

/// Whether `[start, end)` (empty `end`: unbounded) lies in `region`.
pub fn range_in_region(start: &[u8], end: &[u8], region: &metapb::Region) -> bool {
    if !atoll_keys::in_range(start, &region.start_key, &region.end_key) {
        return false;
    }
    region.end_key.is_empty() || (!end.is_empty() && end <= region.end_key.as_slice())
}

impl Client {
    /// The live keys of `[start, end)` (empty `end`: unbounded) at `version`, in key order,
    /// with etcd's metadata: at most `limit` of them (0 = all; none with `count_only`), and
    /// the count of every key in the range.
    pub async fn etcd_range(
        &self,
        start: &[u8],
        end: &[u8],
        version: u64,
        limit: u64,
        keys_only: bool,
        count_only: bool,
    ) -> Result<(Vec<KeyValue>, u64)> {
        self.etcd_range_bypassing(start, end, version, limit, keys_only, count_only, vec![])
            .await
    }

    /// [`Client::etcd_range`], ignoring the locks of the transactions in `bypass` (a
    /// transaction reading past its own locks).
    #[allow(clippy::too_many_arguments)]
    pub async fn etcd_range_bypassing(
        &self,
        start: &[u8],
        end: &[u8],
        version: u64,
        limit: u64,
        keys_only: bool,
        count_only: bool,
        mut bypass: Vec<u64>,
    ) -> Result<(Vec<KeyValue>, u64)> {
        let deadline = self.deadline();
        let mut backoff = self.backoff(deadline);
        let mut kvs: Vec<KeyValue> = vec![];
        let mut count = 0u64;
        let mut cursor = start.to_vec();
        loop {
            let full = count_only || (limit > 0 && kvs.len() as u64 >= limit);
            let want = if full || limit == 0 {
                0
            } else {
                limit - kvs.len() as u64
            };
            let cur = cursor.clone();
            let (region, resp) = self
                .call(Locate::Key(&cursor), deadline, |mut c, mut ctx, region| {
                    ctx.resolved_locks = bypass.clone();
                    let r = &region.region;
                    let e = clip_end(end, r);
                    let req = kvrpcpb::EtcdRangeRequest {
                        context: Some(ctx),
                        start_key: cur.clone(),
                        end_key: e,
                        version,
                        limit: want,
                        keys_only,
                        count_only: full,
                    };
                    async move { c.etcd_range(req).await }
                })
                .await?;
            if let Some(e) = resp.error {
                lock_resolver::resolve_key_error(
                    self,
                    e,
                    version,
                    deadline,
                    &mut bypass,
                    &mut backoff,
                    "range stayed locked",
                )
                .await?;
                continue;
            }
            count += resp.count;
            kvs.extend(resp.kvs);
            let r = region.region;
            if r.end_key.is_empty() || (!end.is_empty() && r.end_key.as_slice() >= end) {
                return Ok((kvs, count));
            }
            cursor = r.end_key;
        }
    }

    /// Runs an etcd txn on the region holding `key`, if everything it touches (`ranges`,
    /// Atoll's `[start, end)` convention) lies in that region. `start_ts` identifies it:
    /// retries after a lost answer are recognised by the store and answered the same.
    pub async fn etcd_txn(
        &self,
        key: &[u8],
        ranges: &[(Vec<u8>, Vec<u8>)],
        txn: &atoll_proto::etcdserverpb::TxnRequest,
        start_ts: u64,
    ) -> Result<EtcdTxnOutcome> {
        let deadline = self.deadline();
        let mut backoff = self.backoff(deadline);
        let mut bypass: Vec<u64> = vec![];
        loop {
            let (region, resp) = self
                .call(Locate::Key(key), deadline, |mut c, mut ctx, region| {
                    ctx.resolved_locks = bypass.clone();
                    let spans = ranges
                        .iter()
                        .any(|(s, e)| !range_in_region(s, e, &region.region));
                    let req = kvrpcpb::EtcdTxnRequest {
                        context: Some(ctx),
                        txn: Some(txn.clone()),
                        start_version: start_ts,
                    };
                    async move {
                        if spans {
                            // Not sent: the caller takes the multi-region path.
                            return Ok(tonic::Response::new(kvrpcpb::EtcdTxnResponse::default()));
                        }
                        c.etcd_txn(req).await
                    }
                })
                .await?;
            if ranges
                .iter()
                .any(|(s, e)| !range_in_region(s, e, &region.region))
            {
                return Ok(EtcdTxnOutcome::SpansRegions);
            }
            if let Some(e) = resp.etcd_error {
                return Ok(EtcdTxnOutcome::Refused(e));
            }
            if let Some(e) = resp.error {
                lock_resolver::resolve_key_error(
                    self,
                    e,
                    0,
                    deadline,
                    &mut bypass,
                    &mut backoff,
                    "keys stayed locked",
                )
                .await?;
                continue;
            }
            return match resp.txn {
                Some(t) => Ok(EtcdTxnOutcome::Done(t)),
                None => Err(Error::Server("etcd txn answered without a result".into())),
            };
        }
    }

    /// A fresh timestamp identifying one write (see [`Client::etcd_txn`]): handed out by PD
    /// after the call, so the write's revision comes out above every revision answered
    /// before it (a block of timestamps fetched earlier would not do); the next timestamp is
    /// reserved for its commit (see `start_version` in kvrpcpb).
    pub async fn write_id(&self) -> Result<u64> {
        Ok(self.pd().get_tso_block(2).await?)
    }
}

/// What one region answered about the changes of a range (see [`Client::region_changes`]).
#[derive(Debug, Default)]
pub struct RegionChanges {
    /// Ascending by (revision, key); a revision's events are all here.
    pub events: Vec<atoll_proto::mvccpb::Event>,
    /// Every change of `[start, end)` in (from, resolved] is in `events`.
    pub resolved: u64,
    /// Where the answered range ends: the region's end, or the asked end if it comes first
    /// (empty: unbounded). The caller asks again from here for the rest.
    pub end: Vec<u8>,
    /// Non-zero when `from` is below the GC safe point: this is the safe point.
    pub compacted: u64,
    /// A transaction lock that held `resolved` back, if any.
    pub lock: Option<kvrpcpb::LockInfo>,
}

impl Client {
    /// The changes of `[start, end)` (empty `end`: unbounded) after version `from`, from the
    /// one region holding `start` (the answer says where it stops), complete up to the
    /// answer's `resolved`: the leader's side of a watch (`Storage::kv_changes`). With
    /// `wait_ms`, the leader waits that long for a change before answering.
    /// `pushed`: transactions (start_ts) whose primary the caller pushed, and the timestamp
    /// it pushed them above (see [`lock_resolver::resolve`]).
    pub async fn region_changes(
        &self,
        start: &[u8],
        end: &[u8],
        from: u64,
        prev_kv: bool,
        wait_ms: u32,
        pushed: &std::collections::HashMap<u64, u64>,
    ) -> Result<RegionChanges> {
        let wait_ms = u64::from(wait_ms).min(self.cfg.rpc_timeout.as_millis() as u64 / 2) as u32;
        let deadline = self.deadline();
        let (region, resp) = self
            .call(Locate::Key(start), deadline, |mut c, ctx, region| {
                let r = &region.region;
                let e = clip_end(end, r);
                let req = kvrpcpb::ChangesRequest {
                    context: Some(ctx),
                    start_key: start.to_vec(),
                    end_key: e,
                    from_version: from,
                    prev_kv,
                    wait_ms,
                    max_bytes: 0,
                    pushed: pushed.clone(),
                };
                async move { c.kv_changes(req).await }
            })
            .await?;
        let end = clip_end(end, &region.region);
        let lock = match resp.error {
            Some(kvrpcpb::KeyError {
                locked: Some(l), ..
            }) => Some(l),
            Some(e) => return Err(crate::errors::key_error(e)),
            None => None,
        };
        Ok(RegionChanges {
            events: resp.events,
            resolved: resp.resolved_version,
            end,
            compacted: resp.compacted_version,
            lock,
        })
    }
}

/// What the owner of a lease's timer says of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTtl {
    /// The TTL granted, in seconds.
    pub granted: i64,
    /// Until the owner expires it, in ms, as of the answer.
    pub remaining_ms: i64,
}

impl Client {
    /// Keep-alive of etcd leases, given as (record key, id): each is renewed by the leader of
    /// its record's region (one call per region, all at once); the answer is (id, TTL it has
    /// again) for each, TTL 0 for a lease that does not exist (or is expiring). Region errors
    /// — a stale map, a split, a new leader still loading its timers — are retried here.
    pub async fn lease_keep_alive(&self, items: &[(Vec<u8>, i64)]) -> Result<Vec<(i64, i64)>> {
        let deadline = self.deadline();
        let mut pending: Vec<(Vec<u8>, i64)> = items.to_vec();
        let mut out = Vec::with_capacity(items.len());
        while !pending.is_empty() {
            if std::time::Instant::now() >= deadline {
                return Err(Error::Timeout(self.cfg.timeout, "lease keep-alive".into()));
            }
            let mut groups: std::collections::HashMap<u64, Vec<(Vec<u8>, i64)>> =
                std::collections::HashMap::new();
            for (k, id) in pending.drain(..) {
                let r = self.cache.locate(&k).await?;
                groups.entry(r.region.id).or_default().push((k, id));
            }
            let calls = groups.into_values().map(|group| async move {
                // What the last attempt sent: the part of the group in the region it reached.
                let sent = parking_lot::Mutex::new(vec![]);
                let r = self
                    .call(Locate::Key(&group[0].0), deadline, |mut c, ctx, region| {
                        let ids: Vec<i64> = group
                            .iter()
                            .filter(|(k, _)| region.contains(k))
                            .map(|(_, id)| *id)
                            .collect();
                        *sent.lock() = ids.clone();
                        let req = kvrpcpb::LeaseKeepAliveRequest {
                            context: Some(ctx),
                            ids,
                        };
                        async move { c.lease_keep_alive(req).await }
                    })
                    .await;
                (group, sent.into_inner(), r)
            });
            for (group, sent, r) in futures::future::join_all(calls).await {
                let (_, resp) = r?;
                if let Some(e) = resp.error {
                    return Err(crate::errors::key_error(e));
                }
                out.extend(sent.iter().copied().zip(resp.ttls.iter().copied()));
                if sent.len() < group.len() {
                    // Part of the group is in another region now: the rest goes again.
                    let sent: std::collections::HashSet<i64> = sent.into_iter().collect();
                    pending.extend(group.into_iter().filter(|(_, id)| !sent.contains(id)));
                }
            }
        }
        Ok(out)
    }

    /// A lease's granted TTL and remaining time from the owner of its timer (`None`: no such
    /// lease, or it is expiring).
    pub async fn lease_time_to_live(&self, record_key: &[u8], id: i64) -> Result<Option<LeaseTtl>> {
        let deadline = self.deadline();
        let (_, resp) = self
            .call(Locate::Key(record_key), deadline, |mut c, ctx, _| {
                let req = kvrpcpb::LeaseTimeToLiveRequest {
                    context: Some(ctx),
                    id,
                };
                async move { c.lease_time_to_live(req).await }
            })
            .await?;
        if let Some(e) = resp.error {
            return Err(crate::errors::key_error(e));
        }
        Ok(resp.found.then_some(LeaseTtl {
            granted: resp.granted_ttl,
            remaining_ms: resp.remaining_ms,
        }))
    }
}
