//! Client transactions: Percolator over the stores' MVCC data with timestamps from PD.
//!
//! - Reads see the snapshot at `start_ts` (plus the transaction's own writes).
//! - Writes are buffered; `commit` prewrites every key (locks pointing at the primary key),
//!   takes a commit timestamp, commits the primary (the commit point), then the secondaries.
//!   A transaction whose keys all live in one region commits in one phase.
//! - Optimistic by default: a write-write conflict is reported at commit as
//!   [`Error::WriteConflict`](crate::Error::WriteConflict); retry with a new transaction.
//!   Pessimistic mode locks keys as they are read for update (`get_for_update`).
//! - A long transaction keeps its primary lock alive with heart beats.

use crate::{errors, lock_resolver, Client, Error, Locate, Result};
use atoll_proto::kvrpcpb;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Failpoint: stop right after prewrite, as a client that dies would (locks stay behind).
pub const FP_AFTER_PREWRITE: &str = "client::txn_after_prewrite";
/// Failpoint: stop after committing the primary, before the secondaries.
pub const FP_AFTER_PRIMARY_COMMIT: &str = "client::txn_after_primary_commit";

#[derive(Clone, Debug)]
pub struct TxnOptions {
    pub pessimistic: bool,
    /// Commit in one phase when every key is in one region.
    pub try_one_pc: bool,
    /// How long locks live without heart beats (ms).
    pub lock_ttl_ms: u64,
}

impl Default for TxnOptions {
    fn default() -> Self {
        TxnOptions {
            pessimistic: false,
            try_one_pc: true,
            lock_ttl_ms: 3000,
        }
    }
}

#[derive(Clone, Debug)]
enum Buffered {
    Put(Vec<u8>),
    Delete,
    /// Read for update (pessimistic lock) without a write.
    Lock,
}

pub struct Transaction {
    client: Arc<Client>,
    start_ts: u64,
    opts: TxnOptions,
    buffer: BTreeMap<Vec<u8>, Buffered>,
    /// etcd leases of buffered puts (keys absent: no lease).
    leases: BTreeMap<Vec<u8>, i64>,
    /// May write the system key space (the etcd layer's lease records).
    system: bool,
    /// Keys holding this transaction's pessimistic locks.
    pessimistic_keys: Vec<Vec<u8>>,
    primary: Option<Vec<u8>>,
    done: bool,
}

impl Client {
    pub async fn begin(self: &Arc<Self>) -> Result<Transaction> {
        self.begin_with(TxnOptions::default()).await
    }

    pub async fn begin_with(self: &Arc<Self>, opts: TxnOptions) -> Result<Transaction> {
        let start_ts = self.tso().await?;
        Ok(Transaction {
            client: self.clone(),
            start_ts,
            opts,
            buffer: BTreeMap::new(),
            leases: BTreeMap::new(),
            system: false,
            pessimistic_keys: vec![],
            primary: None,
            done: false,
        })
    }
}

fn mutation(key: &[u8], b: &Buffered, lease: i64) -> kvrpcpb::Mutation {
    match b {
        Buffered::Put(v) => kvrpcpb::Mutation {
            op: kvrpcpb::Op::Put as i32,
            key: key.to_vec(),
            value: v.clone(),
            lease,
        },
        Buffered::Delete => kvrpcpb::Mutation {
            op: kvrpcpb::Op::Del as i32,
            key: key.to_vec(),
            value: vec![],
            lease: 0,
        },
        Buffered::Lock => kvrpcpb::Mutation {
            op: kvrpcpb::Op::Lock as i32,
            key: key.to_vec(),
            value: vec![],
            lease: 0,
        },
    }
}

impl Transaction {
    pub fn start_ts(&self) -> u64 {
        self.start_ts
    }

    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.buffer.get(key) {
            Some(Buffered::Put(v)) => Ok(Some(v.clone())),
            Some(Buffered::Delete) => Ok(None),
            _ => self.client.get_at(key, self.start_ts).await,
        }
    }

    pub async fn batch_get(&self, keys: &[Vec<u8>]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = vec![];
        let mut remote = vec![];
        for k in keys {
            match self.buffer.get(k) {
                Some(Buffered::Put(v)) => out.push((k.clone(), v.clone())),
                Some(Buffered::Delete) => {}
                _ => remote.push(k.clone()),
            }
        }
        out.extend(self.client.batch_get_at(&remote, self.start_ts).await?);
        out.sort();
        Ok(out)
    }

    /// Keys in `[start, end)` at the snapshot, merged with this transaction's own writes.
    pub async fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = self
            .client
            .scan_at(start, end, 0, false, false, self.start_ts)
            .await?
            .into_iter()
            .collect();
        for (k, b) in self.buffer.range(start.to_vec()..) {
            if !end.is_empty() && k.as_slice() >= end {
                break;
            }
            match b {
                Buffered::Put(v) => {
                    merged.insert(k.clone(), v.clone());
                }
                Buffered::Delete => {
                    merged.remove(k);
                }
                Buffered::Lock => {}
            }
        }
        let mut out: Vec<_> = merged.into_iter().collect();
        if limit > 0 {
            out.truncate(limit);
        }
        Ok(out)
    }

    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<()> {
        self.put_with_lease(key, value, 0)
    }

    /// Lets this transaction write the system key space (`atoll_keys::SYSTEM_PREFIX` and up),
    /// where the etcd layer keeps its lease records. Not for applications.
    pub fn allow_system_keys(&mut self) {
        self.system = true;
    }

    fn check_key(&self, key: &[u8]) -> Result<()> {
        if self.system {
            self.client.check_key_size(key)
        } else {
            self.client.check_key(key)
        }
    }

    /// A put that attaches the key to etcd lease `lease` (0: none) when it commits (the etcd
    /// layer keeps the lease's records; this only carries the id with the key).
    pub fn put_with_lease(&mut self, key: Vec<u8>, value: Vec<u8>, lease: i64) -> Result<()> {
        self.check_key(&key)?;
        self.client.check_value(&value)?;
        if lease != 0 {
            self.leases.insert(key.clone(), lease);
        } else {
            self.leases.remove(&key);
        }
        self.buffer.insert(key, Buffered::Put(value));
        Ok(())
    }

    pub fn delete(&mut self, key: Vec<u8>) -> Result<()> {
        self.check_key(&key)?;
        self.leases.remove(&key);
        self.buffer.insert(key, Buffered::Delete);
        Ok(())
    }

    /// Pessimistic mode: locks `key` now (waiting out other writers) and returns its latest
    /// committed value.
    pub async fn get_for_update(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.client.check_key(key)?;
        if !self.opts.pessimistic {
            return self.get(key).await;
        }
        if self.primary.is_none() {
            self.primary = Some(key.to_vec());
        }
        let primary = self.primary.clone().unwrap_or_default();
        let deadline = self.client.deadline();
        let mut backoff = self.client.backoff(deadline);
        loop {
            let for_update_ts = self.client.tso().await?;
            let (_, resp) = self
                .client
                .call(Locate::Key(key), deadline, |mut c, ctx, _| {
                    let req = kvrpcpb::PessimisticLockRequest {
                        context: Some(ctx),
                        mutations: vec![kvrpcpb::Mutation {
                            op: kvrpcpb::Op::PessimisticLock as i32,
                            key: key.to_vec(),
                            value: vec![],
                            lease: 0,
                        }],
                        primary_lock: primary.clone(),
                        start_version: self.start_ts,
                        lock_ttl: self.opts.lock_ttl_ms,
                        for_update_ts,
                        return_values: true,
                    };
                    async move { c.kv_pessimistic_lock(req).await }
                })
                .await?;
            if let Some(e) = resp.errors.into_iter().next() {
                if let Some(lock) = e.locked {
                    lock_resolver::resolve_and_wait(
                        &self.client,
                        lock,
                        for_update_ts,
                        deadline,
                        &mut vec![],
                        &mut backoff,
                        "key stayed locked",
                    )
                    .await?;
                    continue;
                }
                return Err(errors::key_error(e));
            }
            self.pessimistic_keys.push(key.to_vec());
            self.buffer.entry(key.to_vec()).or_insert(Buffered::Lock);
            let nf = resp.not_founds.first().copied().unwrap_or(true);
            return Ok(if nf {
                None
            } else {
                resp.values.into_iter().next()
            });
        }
    }

    /// Commits; returns the commit timestamp.
    pub async fn commit(mut self) -> Result<u64> {
        match self.prewrite().await? {
            Some(ts) => Ok(ts),
            None => self.commit_prewritten().await,
        }
    }

    /// Phase one: locks every key (or, for a one-region transaction, commits at once and
    /// returns the commit timestamp). On a conflict the locks written so far are rolled back.
    /// Most callers use [`commit`](Self::commit); this split exists for tests and tools that
    /// need to observe a transaction between its phases.
    pub async fn prewrite(&mut self) -> Result<Option<u64>> {
        self.done = true;
        let muts: Vec<kvrpcpb::Mutation> = self
            .buffer
            .iter()
            .map(|(k, b)| mutation(k, b, self.leases.get(k).copied().unwrap_or(0)))
            .collect();
        if muts.is_empty() {
            return Ok(Some(self.start_ts));
        }
        let primary = self.primary.clone().unwrap_or_else(|| muts[0].key.clone());
        self.primary = Some(primary.clone());
        let deadline = self.client.deadline();
        let keys: Vec<Vec<u8>> = muts.iter().map(|m| m.key.clone()).collect();
        let groups = self.client.group_by_region(&keys).await?;
        let by_key: BTreeMap<Vec<u8>, kvrpcpb::Mutation> =
            muts.into_iter().map(|m| (m.key.clone(), m)).collect();
        // One region: one phase.
        if groups.len() == 1 && self.opts.try_one_pc {
            let ms: Vec<_> = by_key.values().cloned().collect();
            if let Some(ts) = self.prewrite_group(&primary, ms, true, deadline).await? {
                return Ok(Some(ts));
            }
            // The store declined one phase: the locks are written; finish in two phases.
        } else {
            let ttl_guard = self.keep_alive(&primary);
            let mut futs = vec![];
            for g in groups {
                let ms: Vec<_> = g.iter().map(|k| by_key[k].clone()).collect();
                futs.push(self.prewrite_group(&primary, ms, false, deadline));
            }
            let results = futures::future::join_all(futs).await;
            drop(ttl_guard);
            if let Some(e) = results.into_iter().find_map(|r| r.err()) {
                self.rollback_keys(&keys, deadline).await;
                return Err(e);
            }
        }
        fail::fail_point!(FP_AFTER_PREWRITE, |_| Err(Error::TxnAborted(
            "failpoint: client stopped after prewrite".into()
        )));
        Ok(None)
    }

    /// Phase two, after [`prewrite`](Self::prewrite) returned `None`: commits the primary (the
    /// commit point), then the secondaries.
    pub async fn commit_prewritten(self) -> Result<u64> {
        let done = self
            .commit_prewritten_checked(|_| std::future::ready(Ok(true)))
            .await?;
        Ok(done.expect("an unconditional commit commits"))
    }

    /// [`commit_prewritten`](Self::commit_prewritten), if `check(commit_ts)` holds just before
    /// the commit point (checked again for every commit timestamp tried). A check that fails
    /// rolls the transaction back: `Ok(None)`. For serializable transactions: `check` re-reads
    /// at the commit timestamp what the transaction read at its start and compares.
    pub async fn commit_prewritten_checked<F, Fut>(self, check: F) -> Result<Option<u64>>
    where
        F: Fn(u64) -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
    {
        let primary = self
            .primary
            .clone()
            .ok_or_else(|| Error::InvalidArgument("commit before prewrite".into()))?;
        let keys: Vec<Vec<u8>> = self.buffer.keys().cloned().collect();
        let deadline = self.client.deadline();
        let mut commit_ts = self.client.tso().await?;
        // A reader may have pushed the primary's minimum commit timestamp past ours: take a
        // newer one.
        loop {
            let holds = match check(commit_ts).await {
                Ok(h) => h,
                Err(e) => {
                    self.rollback_keys(&keys, deadline).await;
                    return Err(e);
                }
            };
            if !holds {
                self.rollback_keys(&keys, deadline).await;
                return Ok(None);
            }
            match self
                .commit_keys(std::slice::from_ref(&primary), commit_ts, deadline)
                .await
            {
                Ok(()) => break,
                Err(Error::CommitTsExpired { min_commit_ts }) => {
                    commit_ts = self.client.tso().await?.max(min_commit_ts);
                }
                Err(e) => return Err(e),
            }
        }
        fail::fail_point!(FP_AFTER_PRIMARY_COMMIT, |_| Ok(Some(commit_ts)));
        let secondaries: Vec<Vec<u8>> = keys.into_iter().filter(|k| *k != primary).collect();
        if !secondaries.is_empty() {
            // Committed already; secondaries are cleaned up now (or later by readers).
            if let Err(e) = self.commit_keys(&secondaries, commit_ts, deadline).await {
                tracing::debug!(error = %e, "committing secondaries (readers will resolve them)");
            }
        }
        Ok(Some(commit_ts))
    }

    /// Heart beats on the primary while prewrites run; they stop when the guard is dropped,
    /// also when the caller gives up (its future is dropped mid-prewrite): an abandoned
    /// transaction's locks must expire, or they hold back readers and watches for ever.
    fn keep_alive(&self, primary: &[u8]) -> AbortOnDrop {
        let client = self.client.clone();
        let primary = primary.to_vec();
        let start_ts = self.start_ts;
        let ttl = self.opts.lock_ttl_ms;
        AbortOnDrop(tokio::spawn(async move {
            let mut n = 1u64;
            loop {
                tokio::time::sleep(Duration::from_millis(ttl / 2)).await;
                n += 1;
                let deadline = Instant::now() + Duration::from_millis(ttl);
                let _ = client
                    .call(Locate::Key(&primary), deadline, |mut c, ctx, _| {
                        let req = kvrpcpb::TxnHeartBeatRequest {
                            context: Some(ctx),
                            primary_lock: primary.clone(),
                            start_version: start_ts,
                            advise_lock_ttl: ttl * n,
                        };
                        async move { c.kv_txn_heart_beat(req).await }
                    })
                    .await;
            }
        }))
    }

    /// Prewrites the mutations of one region (splitting further if the region moved).
    /// With `one_pc`, returns the commit timestamp if the store committed in one phase.
    async fn prewrite_group(
        &self,
        primary: &[u8],
        muts: Vec<kvrpcpb::Mutation>,
        one_pc: bool,
        deadline: Instant,
    ) -> Result<Option<u64>> {
        let total = muts.len();
        let mut pending = muts;
        let mut backoff = self.client.backoff(deadline);
        let secondaries: Vec<Vec<u8>> = vec![];
        while !pending.is_empty() {
            let first = pending[0].key.clone();
            let (region, resp) = self
                .client
                .call(Locate::Key(&first), deadline, |mut c, ctx, region| {
                    let mine: Vec<kvrpcpb::Mutation> = pending
                        .iter()
                        .filter(|m| region.contains(&m.key))
                        .cloned()
                        .collect();
                    let n = mine.len();
                    // One phase only for the whole transaction in one request: once the keys
                    // span regions (the cache was stale), some are locked in two phases and
                    // committing the rest at once would split the transaction.
                    let whole = n == total;
                    let req = kvrpcpb::PrewriteRequest {
                        context: Some(ctx),
                        mutations: mine,
                        primary_lock: primary.to_vec(),
                        start_version: self.start_ts,
                        lock_ttl: self.opts.lock_ttl_ms,
                        txn_size: n as u64,
                        use_async_commit: false,
                        secondaries: secondaries.clone(),
                        try_one_pc: one_pc && whole,
                        max_commit_ts: 0,
                        for_update_ts: 0,
                        is_pessimistic_lock: vec![],
                    };
                    let req = self.mark_pessimistic(req);
                    async move { c.kv_prewrite(req).await }
                })
                .await?;
            if let Some(e) = resp.errors.iter().find(|e| e.locked.is_none()).cloned() {
                return Err(errors::key_error(e));
            }
            let locks: Vec<kvrpcpb::LockInfo> =
                resp.errors.into_iter().filter_map(|e| e.locked).collect();
            if !locks.is_empty() {
                let wait = lock_resolver::resolve(
                    &self.client,
                    locks,
                    self.start_ts,
                    deadline,
                    &mut vec![],
                )
                .await?;
                if wait > 0
                    && !backoff
                        .wait_at_least(Duration::from_millis(wait.min(200)))
                        .await
                {
                    return Err(Error::Timeout(
                        self.client.config().timeout,
                        "keys stayed locked".into(),
                    ));
                }
                continue;
            }
            if resp.one_pc_commit_ts > 0 {
                return Ok(Some(resp.one_pc_commit_ts));
            }
            pending.retain(|m| !region.contains(&m.key));
        }
        Ok(None)
    }

    fn mark_pessimistic(&self, mut req: kvrpcpb::PrewriteRequest) -> kvrpcpb::PrewriteRequest {
        if self.opts.pessimistic && !self.pessimistic_keys.is_empty() {
            req.for_update_ts = self.start_ts;
            req.is_pessimistic_lock = req
                .mutations
                .iter()
                .map(|m| self.pessimistic_keys.contains(&m.key))
                .collect();
        }
        req
    }

    async fn commit_keys(&self, keys: &[Vec<u8>], commit_ts: u64, deadline: Instant) -> Result<()> {
        let mut pending: Vec<Vec<u8>> = keys.to_vec();
        while !pending.is_empty() {
            let first = pending[0].clone();
            let (region, resp) = self
                .client
                .call(Locate::Key(&first), deadline, |mut c, ctx, region| {
                    let mine: Vec<Vec<u8>> = pending
                        .iter()
                        .filter(|k| region.contains(k))
                        .cloned()
                        .collect();
                    let req = kvrpcpb::CommitRequest {
                        context: Some(ctx),
                        start_version: self.start_ts,
                        keys: mine,
                        commit_version: commit_ts,
                    };
                    async move { c.kv_commit(req).await }
                })
                .await?;
            if let Some(e) = resp.error {
                if e.txn_lock_not_found.is_some() || e.txn_not_found.is_some() {
                    return Err(Error::TxnRolledBack(self.start_ts));
                }
                if let Some(x) = &e.commit_ts_expired {
                    return Err(Error::CommitTsExpired {
                        min_commit_ts: x.min_commit_ts,
                    });
                }
                return Err(errors::key_error(e));
            }
            pending.retain(|k| !region.contains(k));
        }
        Ok(())
    }

    async fn rollback_keys(&self, keys: &[Vec<u8>], deadline: Instant) {
        let mut pending: Vec<Vec<u8>> = keys.to_vec();
        while !pending.is_empty() {
            let first = pending[0].clone();
            let r = self
                .client
                .call(Locate::Key(&first), deadline, |mut c, ctx, region| {
                    let mine: Vec<Vec<u8>> = pending
                        .iter()
                        .filter(|k| region.contains(k))
                        .cloned()
                        .collect();
                    let req = kvrpcpb::BatchRollbackRequest {
                        context: Some(ctx),
                        start_version: self.start_ts,
                        keys: mine,
                    };
                    async move { c.kv_batch_rollback(req).await }
                })
                .await;
            match r {
                Ok((region, _)) => pending.retain(|k| !region.contains(k)),
                Err(e) => {
                    tracing::debug!(error = %e, "rollback (readers will resolve the locks)");
                    return;
                }
            }
        }
    }

    /// Abandons the transaction, removing any locks it holds.
    pub async fn rollback(mut self) -> Result<()> {
        self.done = true;
        let deadline = self.client.deadline();
        let mut keys: Vec<Vec<u8>> = self.pessimistic_keys.clone();
        keys.sort();
        keys.dedup();
        if !keys.is_empty() {
            let mut pending = keys;
            while !pending.is_empty() {
                let first = pending[0].clone();
                let (region, _) = self
                    .client
                    .call(Locate::Key(&first), deadline, |mut c, ctx, region| {
                        let mine: Vec<Vec<u8>> = pending
                            .iter()
                            .filter(|k| region.contains(k))
                            .cloned()
                            .collect();
                        let req = kvrpcpb::PessimisticRollbackRequest {
                            context: Some(ctx),
                            start_version: self.start_ts,
                            for_update_ts: u64::MAX,
                            keys: mine,
                        };
                        async move { c.kv_pessimistic_rollback(req).await }
                    })
                    .await?;
                pending.retain(|k| !region.contains(k));
            }
        }
        Ok(())
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if !self.done && !self.pessimistic_keys.is_empty() {
            tracing::debug!(
                start_ts = self.start_ts,
                "transaction dropped with pessimistic locks; they expire after their TTL"
            );
        }
    }
}

/// A task aborted when this is dropped (a `JoinHandle` dropped lets its task run on).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
