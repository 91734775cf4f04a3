//! Percolator commands: prewrite (one phase when asked), commit, rollback, lock resolution,
//! transaction status, pessimistic locks, lock scans.

use crate::storage::*;
use atoll_engine::KvEngine;
use atoll_proto::kvrpcpb::*;
use atoll_proto::metapb;
use atoll_txn::{MvccReader, MvccTxn, TxnStatus};
use tonic::Status;

impl<E: KvEngine> Storage<E> {
    // ---------------- transactions ----------------

    /// Runs a transaction command on `keys` (latched) and proposes its mutations. `f` may run
    /// twice (see [`Self::decide_on_leader`]).
    async fn txn_cmd<T, F>(
        &self,
        ctx: &Context,
        keys: &[Vec<u8>],
        start_ts: u64,
        f: F,
    ) -> Result<T, Fail>
    where
        F: Fn(&mut MvccTxn, &MvccReader<E::Snapshot>, &metapb::Region) -> Result<T, Fail>,
    {
        let mut ks = keys.to_vec();
        ks.sort();
        ks.dedup();
        let latch = self.latches.acquire(&ks).await;
        let (snap, (out, mods)) = self
            .decide_on_leader(ctx, &ks, |snap| {
                let reader = MvccReader::new(snap.snap.clone());
                let mut txn = MvccTxn::new(start_ts);
                let out = f(&mut txn, &reader, &snap.region)?;
                let mods = txn.into_modifies();
                let writes = !mods.is_empty();
                Ok(((out, mods), writes))
            })
            .await?;
        self.propose(ctx, &snap.region, mods, latch).await?;
        Ok(out)
    }

    pub async fn kv_prewrite(&self, req: PrewriteRequest) -> RespResult<PrewriteResponse> {
        let ctx = self.check_ctx(&req.context)?;
        if req.mutations.is_empty() || req.start_version == 0 || req.primary_lock.is_empty() {
            return Err(Status::invalid_argument(
                "prewrite needs mutations, a start version and a primary",
            ));
        }
        let mut size = 0u64;
        for m in &req.mutations {
            self.check_key(&m.key)?;
            self.check_value(&m.value)?;
            size += (m.key.len() + m.value.len()) as u64;
        }
        if size > self.cfg.max_batch_size.0 {
            return Err(Status::invalid_argument(format!(
                "prewrite of {size} bytes exceeds {} bytes",
                self.cfg.max_batch_size.0
            )));
        }
        let mut resp = PrewriteResponse::default();
        let keys: Vec<Vec<u8>> = req.mutations.iter().map(|m| m.key.clone()).collect();
        let one_pc = req.try_one_pc;
        let r: Result<u64, Fail> = async {
            let mut ks = keys.clone();
            ks.sort();
            ks.dedup();
            let latch = self.latches.acquire(&ks).await;
            let mem = if one_pc {
                Some(self.cm.lock_keys(&ks))
            } else {
                None
            };
            let params = atoll_txn::PrewriteParams {
                primary: req.primary_lock.clone(),
                start_ts: req.start_version,
                lock_ttl: req.lock_ttl,
                txn_size: req.txn_size,
                for_update_ts: req.for_update_ts,
                use_async_commit: false,
                secondaries: vec![],
                min_commit_ts: 0,
                max_commit_ts: req.max_commit_ts,
                one_pc,
            };
            // Ok(Err(commit_ts)): a retry of a one-phase prewrite that already committed.
            let (snap, prewritten) = self
                .decide_on_leader(&ctx, &ks, |snap| {
                    let reader = MvccReader::new(snap.snap.clone());
                    let mut txn = MvccTxn::new(req.start_version);
                    let mut errors = vec![];
                    for (i, m) in req.mutations.iter().enumerate() {
                        let op = Op::try_from(m.op)
                            .map_err(|_| abort(format!("unknown op {}", m.op)))?;
                        let pess = req.is_pessimistic_lock.get(i).copied().unwrap_or(false);
                        let mutation = (op, m.key.as_slice(), m.value.as_slice());
                        let lease = m.lease as u64;
                        match atoll_txn::prewrite_with_lease(
                            &mut txn, &reader, &params, mutation, lease, pess,
                        ) {
                            Ok(_) => {}
                            Err(atoll_txn::Error::Committed { commit_ts, .. }) if one_pc => {
                                return Ok((Err(commit_ts), false))
                            }
                            Err(atoll_txn::Error::Committed { .. }) => {}
                            Err(e) => errors.push(e.to_key_error()),
                        }
                    }
                    if !errors.is_empty() {
                        // Every problem is reported at once (the client resolves all the
                        // locks); nothing of this prewrite is written.
                        return Err(Fail::Keys(errors));
                    }
                    let writes = !txn.is_empty();
                    Ok((Ok(txn), writes))
                })
                .await?;
            let mut txn = match prewritten {
                Ok(txn) => txn,
                Err(commit_ts) => {
                    self.commit_wait(commit_ts, req.start_version).await?;
                    return Ok(commit_ts);
                }
            };
            if one_pc {
                self.ensure_max_ts_synced(snap.region.id, snap.term).await?;
            }
            let reader = MvccReader::new(snap.snap.clone());
            let mut commit_ts = 0;
            if one_pc {
                let mut newest = 0;
                for k in &ks {
                    newest = newest.max(reader.latest_commit_ts(k)?.unwrap_or(0));
                }
                commit_ts = self
                    .one_pc_commit_ts(req.start_version, newest, false)
                    .await?;
                if req.max_commit_ts != 0 && commit_ts > req.max_commit_ts {
                    // Fall back to two phases: write the locks instead.
                    return Err(abort("one-phase commit timestamp above max_commit_ts"));
                }
                if let Some(m) = &mem {
                    m.set_commit_ts(commit_ts);
                }
                txn.commit_one_pc(&reader, commit_ts)?;
            }
            // A one-phase commit is answered only once PD has passed its timestamp (see
            // commit_wait); a prewrite's commit timestamp comes from PD later.
            let wait_for = if one_pc { commit_ts } else { 0 };
            let (proposed, waited) = tokio::join!(
                self.propose(&ctx, &snap.region, txn.into_modifies(), (latch, mem)),
                self.commit_wait(wait_for, req.start_version)
            );
            proposed?;
            waited?;
            Ok(commit_ts)
        }
        .await;
        match r {
            Ok(ts) => resp.one_pc_commit_ts = ts,
            Err(f) => fail_into!(resp, f, keys),
        }
        Ok(resp)
    }

    pub async fn kv_commit(&self, req: CommitRequest) -> RespResult<CommitResponse> {
        let ctx = self.check_ctx(&req.context)?;
        if req.commit_version <= req.start_version {
            return Err(Status::invalid_argument(
                "commit version must exceed start version",
            ));
        }
        let mut resp = CommitResponse::default();
        let keys = req.keys.clone();
        let r = self
            .txn_cmd(&ctx, &req.keys, req.start_version, |txn, reader, _| {
                for k in &keys {
                    atoll_txn::commit(txn, reader, k, req.commit_version)?;
                }
                Ok(())
            })
            .await;
        match r {
            Ok(()) => resp.commit_version = req.commit_version,
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    pub async fn kv_batch_rollback(
        &self,
        req: BatchRollbackRequest,
    ) -> RespResult<BatchRollbackResponse> {
        let ctx = self.check_ctx(&req.context)?;
        let mut resp = BatchRollbackResponse::default();
        let keys = req.keys.clone();
        let r = self
            .txn_cmd(&ctx, &req.keys, req.start_version, |txn, reader, _| {
                // A later one-phase commit must not pick this start_ts as its commit_ts.
                self.cm.update_max_ts(req.start_version);
                for k in &keys {
                    atoll_txn::rollback(txn, reader, k, false)?;
                }
                Ok(())
            })
            .await;
        if let Err(f) = r {
            fail_into!(resp, f, key);
        }
        Ok(resp)
    }

    pub async fn kv_check_txn_status(
        &self,
        req: CheckTxnStatusRequest,
    ) -> RespResult<CheckTxnStatusResponse> {
        let ctx = self.check_ctx(&req.context)?;
        let mut resp = CheckTxnStatusResponse::default();
        if req.caller_start_ts != 0 && req.caller_start_ts != u64::MAX {
            self.cm.update_max_ts(req.caller_start_ts);
        }
        let primary = req.primary_key.clone();
        let r = self
            .txn_cmd(
                &ctx,
                std::slice::from_ref(&req.primary_key),
                req.lock_ts,
                |txn, reader, _| {
                    self.cm.update_max_ts(req.lock_ts);
                    Ok(atoll_txn::check_txn_status(
                        txn,
                        reader,
                        &primary,
                        req.lock_ts,
                        req.caller_start_ts,
                        req.current_ts,
                        req.rollback_if_not_exist,
                    )?)
                },
            )
            .await;
        match r {
            Ok(s) => {
                resp.action = s.action() as i32;
                match s {
                    TxnStatus::Locked { ttl, lock_info, .. } => {
                        resp.lock_ttl = ttl.max(1);
                        resp.lock_info = Some(lock_info);
                    }
                    TxnStatus::Committed { commit_ts } => resp.commit_version = commit_ts,
                    TxnStatus::RolledBack
                    | TxnStatus::TtlExpire
                    | TxnStatus::LockNotExistRollback => {}
                }
            }
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    pub async fn kv_check_secondary_locks(
        &self,
        req: CheckSecondaryLocksRequest,
    ) -> RespResult<CheckSecondaryLocksResponse> {
        let ctx = self.check_ctx(&req.context)?;
        let mut resp = CheckSecondaryLocksResponse::default();
        let keys = req.keys.clone();
        let r = self
            .txn_cmd(&ctx, &req.keys, req.start_version, |txn, reader, _| {
                self.cm.update_max_ts(req.start_version);
                Ok(atoll_txn::check_secondary_locks(
                    txn,
                    reader,
                    &keys,
                    req.start_version,
                )?)
            })
            .await;
        match r {
            Ok(atoll_txn::SecondaryLocksStatus::Locked(l)) => resp.locks = l,
            Ok(atoll_txn::SecondaryLocksStatus::Committed(ts)) => resp.commit_ts = ts,
            Ok(atoll_txn::SecondaryLocksStatus::RolledBack) => {}
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    pub async fn kv_resolve_lock(
        &self,
        req: ResolveLockRequest,
    ) -> RespResult<ResolveLockResponse> {
        let ctx = self.check_ctx(&req.context)?;
        let mut resp = ResolveLockResponse::default();
        let keys = if req.keys.is_empty() {
            // Every lock of the transaction in this region ("none" is confirmed like any
            // answer that writes nothing).
            let found = self
                .decide_on_leader(&ctx, &[], |snap| {
                    let r = &snap.region;
                    let locks = MvccReader::new(snap.snap.clone()).scan_locks(
                        &r.start_key,
                        &r.end_key,
                        u64::MAX,
                        0,
                    )?;
                    let keys: Vec<Vec<u8>> = locks
                        .into_iter()
                        .filter(|(_, l)| l.start_ts == req.start_version)
                        .map(|(k, _)| k)
                        .collect();
                    let some = !keys.is_empty();
                    Ok((keys, some))
                })
                .await;
            match found {
                Ok((_, keys)) => keys,
                Err(f) => {
                    fail_into!(resp, f, key);
                    return Ok(resp);
                }
            }
        } else {
            req.keys.clone()
        };
        if keys.is_empty() {
            return Ok(resp);
        }
        let ks = keys.clone();
        let r = self
            .txn_cmd(&ctx, &keys, req.start_version, |txn, reader, _| {
                if req.commit_version == 0 {
                    self.cm.update_max_ts(req.start_version);
                }
                for k in &ks {
                    atoll_txn::resolve_lock(txn, reader, k, req.start_version, req.commit_version)?;
                }
                Ok(())
            })
            .await;
        if let Err(f) = r {
            fail_into!(resp, f, key);
        }
        Ok(resp)
    }

    pub async fn kv_txn_heart_beat(
        &self,
        req: TxnHeartBeatRequest,
    ) -> RespResult<TxnHeartBeatResponse> {
        let ctx = self.check_ctx(&req.context)?;
        let mut resp = TxnHeartBeatResponse::default();
        let primary = req.primary_lock.clone();
        let r = self
            .txn_cmd(
                &ctx,
                std::slice::from_ref(&req.primary_lock),
                req.start_version,
                |txn, reader, _| {
                    Ok(atoll_txn::txn_heart_beat(
                        txn,
                        reader,
                        &primary,
                        req.start_version,
                        req.advise_lock_ttl,
                    )?)
                },
            )
            .await;
        match r {
            Ok(ttl) => resp.lock_ttl = ttl,
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    pub async fn kv_pessimistic_lock(
        &self,
        req: PessimisticLockRequest,
    ) -> RespResult<PessimisticLockResponse> {
        let ctx = self.check_ctx(&req.context)?;
        for m in &req.mutations {
            self.check_key(&m.key)?;
        }
        let mut resp = PessimisticLockResponse::default();
        let keys: Vec<Vec<u8>> = req.mutations.iter().map(|m| m.key.clone()).collect();
        let ks = keys.clone();
        let r = self
            .txn_cmd(&ctx, &keys, req.start_version, |txn, reader, _| {
                let mut values = vec![];
                for k in &ks {
                    values.push(atoll_txn::acquire_pessimistic_lock(
                        txn,
                        reader,
                        k,
                        &req.primary_lock,
                        req.start_version,
                        req.for_update_ts,
                        req.lock_ttl,
                        req.return_values,
                    )?);
                }
                Ok(values)
            })
            .await;
        match r {
            Ok(values) => {
                for v in values {
                    resp.not_founds.push(v.is_none());
                    resp.values.push(v.unwrap_or_default());
                }
            }
            Err(f) => fail_into!(resp, f, keys),
        }
        Ok(resp)
    }

    pub async fn kv_pessimistic_rollback(
        &self,
        req: PessimisticRollbackRequest,
    ) -> RespResult<PessimisticRollbackResponse> {
        let ctx = self.check_ctx(&req.context)?;
        let mut resp = PessimisticRollbackResponse::default();
        let keys = req.keys.clone();
        let r = self
            .txn_cmd(&ctx, &req.keys, req.start_version, |txn, reader, _| {
                for k in &keys {
                    atoll_txn::pessimistic_rollback(
                        txn,
                        reader,
                        k,
                        req.start_version,
                        req.for_update_ts,
                    )?;
                }
                Ok(())
            })
            .await;
        if let Err(f) = r {
            fail_into!(resp, f, keys);
        }
        Ok(resp)
    }

    pub async fn kv_scan_lock(&self, req: ScanLockRequest) -> RespResult<ScanLockResponse> {
        let ctx = self.check_ctx(&req.context)?;
        let mut resp = ScanLockResponse::default();
        let r: Result<Vec<LockInfo>, Fail> = async {
            let snap = self.read_snapshot(&ctx, 0, None, None).await?;
            let r = &snap.region;
            let start = if req.start_key.as_slice() < r.start_key.as_slice() {
                r.start_key.clone()
            } else {
                req.start_key.clone()
            };
            let end =
                if req.end_key.is_empty() || (!r.end_key.is_empty() && req.end_key > r.end_key) {
                    r.end_key.clone()
                } else {
                    req.end_key.clone()
                };
            let locks = MvccReader::new(snap.snap.clone()).scan_locks(
                &start,
                &end,
                req.max_version,
                req.limit as usize,
            )?;
            Ok(locks
                .into_iter()
                .map(|(k, l)| l.into_lock_info(k))
                .collect())
        }
        .await;
        match r {
            Ok(l) => resp.locks = l,
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }
}
