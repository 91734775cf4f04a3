//! `txn.rs`: Percolator commands through [`Storage`].

use super::*;

/// `ms` milliseconds after `ts` (TSO timestamps carry milliseconds above 18 logical bits).
fn later(ts: u64, ms: u64) -> u64 {
    ts + (ms << 18)
}

fn check_status(
    c: &Cluster,
    primary: &[u8],
    lock_ts: u64,
    caller: u64,
    now: u64,
    rollback: bool,
) -> CheckTxnStatusResponse {
    let req = CheckTxnStatusRequest {
        context: c.ctx(primary),
        primary_key: primary.to_vec(),
        lock_ts,
        caller_start_ts: caller,
        current_ts: now,
        rollback_if_not_exist: rollback,
    };
    c.run(c.s(primary).kv_check_txn_status(req)).unwrap()
}

fn resolve(c: &Cluster, keys: &[&[u8]], start_ts: u64, commit_ts: u64) {
    let req = ResolveLockRequest {
        context: c.ctx(b"a"),
        start_version: start_ts,
        commit_version: commit_ts,
        keys: keys.iter().map(|k| k.to_vec()).collect(),
    };
    let resp = c.run(c.s(b"a").kv_resolve_lock(req)).unwrap();
    must_ok(&resp.region_error, &resp.error);
}

fn heart_beat(c: &Cluster, primary: &[u8], start_ts: u64, ttl: u64) -> TxnHeartBeatResponse {
    let req = TxnHeartBeatRequest {
        context: c.ctx(primary),
        primary_lock: primary.to_vec(),
        start_version: start_ts,
        advise_lock_ttl: ttl,
    };
    c.run(c.s(primary).kv_txn_heart_beat(req)).unwrap()
}

fn pessimistic_lock(
    c: &Cluster,
    keys: &[&[u8]],
    start_ts: u64,
    for_update_ts: u64,
) -> PessimisticLockResponse {
    let req = PessimisticLockRequest {
        context: c.ctx(keys[0]),
        mutations: keys
            .iter()
            .map(|k| mutation(Op::PessimisticLock, k, b""))
            .collect(),
        primary_lock: keys[0].to_vec(),
        start_version: start_ts,
        lock_ttl: 10_000,
        for_update_ts,
        return_values: true,
    };
    c.run(c.s(keys[0]).kv_pessimistic_lock(req)).unwrap()
}

fn lock_keys(locks: &[LockInfo]) -> Vec<(Vec<u8>, u64)> {
    locks
        .iter()
        .map(|l| (l.key.clone(), l.lock_version))
        .collect()
}

#[test]
fn a_committed_transaction_is_visible_from_its_commit_timestamp_on() {
    let c = Cluster::one();
    let start = c.ts();
    c.must_prewrite(&[(b"a", b"1"), (b"b", b"2")], start);
    // Locked for a reader after start; not for one before.
    must_locked(&c.get(b"b", c.ts()).error, start, b"a");
    assert_eq!(c.must_get(b"b", start - 1), None);
    let commit = c.ts();
    c.must_commit(&[b"a", b"b"], start, commit);
    assert_eq!(c.must_get(b"a", commit), Some(b"1".to_vec()));
    assert_eq!(c.must_get(b"b", commit), Some(b"2".to_vec()));
    assert_eq!(c.must_get(b"b", commit - 1), None);
    assert!(c.must_scan_locks(b"", u64::MAX).is_empty());
}

#[test]
fn a_reader_may_pass_the_locks_of_transactions_it_resolved() {
    let c = Cluster::one();
    let start = c.must_lock_over(b"k", b"old");
    let mut ctx = c.ctx(b"k").unwrap();
    ctx.resolved_locks = vec![start];
    let resp = c.get_on(1, ctx, b"k", c.ts());
    must_ok(&resp.region_error, &resp.error);
    assert_eq!(resp.value, b"old".to_vec());
}

#[test]
fn a_prewrite_below_a_newer_commit_is_a_write_conflict_and_writes_nothing() {
    let c = Cluster::one();
    let s1 = c.ts();
    let s2 = c.ts();
    c.must_prewrite(&[(b"k", b"2")], s2);
    let c2 = c.ts();
    c.must_commit(&[b"k"], s2, c2);
    let resp = c.prewrite(prewrite_req(&[(b"k", b"1"), (b"other", b"1")], s1));
    assert_eq!(resp.errors.len(), 1);
    let wc = resp.errors[0].conflict.clone().expect("a write conflict");
    assert_eq!(
        (
            wc.start_ts,
            wc.conflict_ts,
            wc.conflict_commit_ts,
            wc.key,
            wc.primary
        ),
        (s1, s2, c2, b"k".to_vec(), b"k".to_vec())
    );
    assert!(c.must_scan_locks(b"", u64::MAX).is_empty());
    assert_eq!(c.must_get(b"k", 0), Some(b"2".to_vec()));
}

#[test]
fn a_prewrite_reports_every_lock_it_meets_and_writes_no_lock() {
    let c = Cluster::one();
    let a = c.ts();
    c.must_prewrite(&[(b"a", b"A"), (b"b", b"A")], a);
    let b = c.ts();
    let resp = c.prewrite(prewrite_req(&[(b"c", b"B"), (b"a", b"B"), (b"b", b"B")], b));
    assert_eq!(resp.errors.len(), 2, "{resp:?}");
    for e in &resp.errors {
        must_locked(&Some(e.clone()), a, b"a");
    }
    let locks = c.must_scan_locks(b"", u64::MAX);
    assert_eq!(
        lock_keys(&locks),
        vec![(b"a".to_vec(), a), (b"b".to_vec(), a)]
    );
}

#[test]
fn a_rolled_back_transaction_can_neither_commit_nor_prewrite_again() {
    let c = Cluster::one();
    let start = c.ts();
    c.must_prewrite(&[(b"k", b"v")], start);
    let rb = c.rollback(&[b"k"], start);
    must_ok(&rb.region_error, &rb.error);
    let resp = c.commit(&[b"k"], start, c.ts());
    assert_eq!(
        resp.error.unwrap().txn_lock_not_found.unwrap().key,
        b"k".to_vec()
    );
    assert_eq!(c.must_get(b"k", 0), None);
    let resp = c.prewrite(prewrite_req(&[(b"k", b"v")], start));
    let wc = resp.errors[0].conflict.clone().expect("a write conflict");
    assert_eq!((wc.start_ts, wc.conflict_ts), (start, start));
    let st = check_status(&c, b"k", start, 0, c.ts(), false);
    must_ok(&st.region_error, &st.error);
    assert_eq!((st.lock_ttl, st.commit_version), (0, 0));
    assert_eq!(st.action, Action::NoAction as i32);
}

#[test]
fn a_commit_is_idempotent_and_a_committed_transaction_cannot_roll_back() {
    let c = Cluster::one();
    let start = c.ts();
    c.must_prewrite(&[(b"k", b"v")], start);
    let commit = c.ts();
    c.must_commit(&[b"k"], start, commit);
    c.must_commit(&[b"k"], start, commit);
    let rb = c.rollback(&[b"k"], start);
    must_abort(&rb.error, "already committed");
    assert_eq!(c.must_get(b"k", 0), Some(b"v".to_vec()));
    assert_eq!(c.must_etcd_kv(b"k").unwrap().version, 1);
    must_invalid(c.run(c.storage(1).kv_commit(CommitRequest {
        context: c.ctx(b"k"),
        start_version: start,
        keys: vec![b"k".to_vec()],
        commit_version: start,
    })));
}

#[test]
fn check_txn_status_pushes_expires_and_reports_commits() {
    let c = Cluster::one();
    // Alive: a reader at `caller` pushes the lock's min_commit_ts above itself.
    let (start, caller) = (c.ts(), c.ts());
    c.must_prewrite(&[(b"p", b"v")], start);
    let st = check_status(&c, b"p", start, caller, caller, false);
    must_ok(&st.region_error, &st.error);
    assert_eq!(st.lock_ttl, 10_000);
    assert_eq!(st.action, Action::MinCommitTsPushed as i32);
    let info = st.lock_info.unwrap();
    assert_eq!(
        (info.lock_version, info.primary_lock),
        (start, b"p".to_vec())
    );
    assert!(info.min_commit_ts > caller);
    // Pushed: committing at or below the reader is refused.
    let resp = c.commit(&[b"p"], start, caller);
    assert_eq!(
        resp.error.unwrap().commit_ts_expired.unwrap().min_commit_ts,
        info.min_commit_ts
    );
    let commit = c.ts();
    c.must_commit(&[b"p"], start, commit);
    let st = check_status(&c, b"p", start, 0, c.ts(), false);
    assert_eq!((st.commit_version, st.lock_ttl), (commit, 0));

    // Expired: rolled back now.
    let old = c.ts();
    let mut req = prewrite_req(&[(b"q", b"v")], old);
    req.lock_ttl = 1;
    let resp = c.prewrite(req);
    assert!(resp.errors.is_empty());
    let st = check_status(&c, b"q", old, 0, later(old, 10_000), false);
    assert_eq!(st.action, Action::TtlExpireRollback as i32);
    assert_eq!((st.lock_ttl, st.commit_version), (0, 0));
    assert!(c.must_scan_locks(b"q", u64::MAX).is_empty());
}

#[test]
fn check_txn_status_of_a_missing_transaction_rolls_it_back_only_if_asked() {
    let c = Cluster::one();
    let start = c.ts();
    let st = check_status(&c, b"p", start, 0, c.ts(), false);
    let nf = st.error.unwrap().txn_not_found.unwrap();
    assert_eq!((nf.start_ts, nf.primary_key), (start, b"p".to_vec()));
    let st = check_status(&c, b"p", start, 0, c.ts(), true);
    must_ok(&st.region_error, &st.error);
    assert_eq!(st.action, Action::LockNotExistRollback as i32);
    // The transaction arrives late: it cannot prewrite any more.
    let resp = c.prewrite(prewrite_req(&[(b"p", b"v")], start));
    assert!(resp.errors[0].conflict.is_some(), "{resp:?}");
    // Rolling back raised max_ts: no one-phase write may commit at that start_ts.
    assert!(c.storage(1).max_ts() >= start);
}

#[test]
fn resolve_lock_without_keys_resolves_every_lock_of_its_transaction() {
    let c = Cluster::one();
    let a = c.ts();
    c.must_prewrite(&[(b"a", b"1"), (b"b", b"1"), (b"c", b"1")], a);
    let b = c.ts();
    c.must_prewrite(&[(b"d", b"2")], b);
    let commit = c.ts();
    resolve(&c, &[], a, commit);
    let locks = c.must_scan_locks(b"", u64::MAX);
    assert_eq!(lock_keys(&locks), vec![(b"d".to_vec(), b)]);
    for k in [b"a", b"b", b"c"] {
        assert_eq!(c.must_get(k, commit), Some(b"1".to_vec()));
    }
    resolve(&c, &[b"d"], b, 0);
    assert!(c.must_scan_locks(b"", u64::MAX).is_empty());
    assert_eq!(c.must_get(b"d", 0), None);
    // Nothing left to resolve: still an answer.
    resolve(&c, &[], b, 0);
}

#[test]
fn a_heart_beat_only_lengthens_the_primary_lock() {
    let c = Cluster::one();
    let start = c.ts();
    c.must_prewrite(&[(b"p", b"v"), (b"s", b"v")], start);
    assert_eq!(heart_beat(&c, b"p", start, 20_000).lock_ttl, 20_000);
    assert_eq!(heart_beat(&c, b"p", start, 5_000).lock_ttl, 20_000);
    let st = check_status(&c, b"p", start, 0, c.ts(), false);
    assert_eq!(st.lock_ttl, 20_000);
    let resp = heart_beat(&c, b"p", c.ts(), 20_000);
    assert!(resp.error.unwrap().txn_not_found.is_some());
}

#[test]
fn scan_lock_filters_by_version_and_limit() {
    let c = Cluster::one();
    let (a, b) = (c.ts(), c.ts());
    c.must_prewrite(&[(b"c", b"2")], b);
    c.must_prewrite(&[(b"a", b"1"), (b"b", b"1")], a);
    let all = c.must_scan_locks(b"", u64::MAX);
    assert_eq!(lock_keys(&all).len(), 3);
    assert_eq!(all[0].lock_ttl, 10_000);
    let old = c.must_scan_locks(b"", a);
    assert_eq!(
        lock_keys(&old),
        vec![(b"a".to_vec(), a), (b"b".to_vec(), a)]
    );
    let req = ScanLockRequest {
        context: c.ctx(b"a"),
        max_version: u64::MAX,
        start_key: b"b".to_vec(),
        end_key: vec![],
        limit: 1,
    };
    let resp = c.run(c.storage(1).kv_scan_lock(req)).unwrap();
    assert_eq!(lock_keys(&resp.locks), vec![(b"b".to_vec(), a)]);
}

#[test]
fn pessimistic_locks_block_others_then_prewrite_and_commit() {
    let c = Cluster::one();
    c.must_put(b"a", b"old");
    let start = c.ts();
    let resp = pessimistic_lock(&c, &[b"a", b"b"], start, start);
    assert!(resp.errors.is_empty(), "{resp:?}");
    assert_eq!(resp.values, vec![b"old".to_vec(), vec![]]);
    assert_eq!(resp.not_founds, vec![false, true]);
    // Another transaction meets the lock.
    let other = c.ts();
    let resp = pessimistic_lock(&c, &[b"b"], other, other);
    must_locked(&resp.errors.first().cloned(), start, b"a");
    must_locked(&c.put(b"a", b"x", c.ts()).error, start, b"a");
    // A pessimistic lock never commits as such.
    must_abort(
        &c.commit(&[b"a"], start, c.ts()).error,
        "lock type mismatch",
    );
    let mut req = prewrite_req(&[(b"a", b"new"), (b"b", b"new")], start);
    req.for_update_ts = start;
    req.is_pessimistic_lock = vec![true, true];
    let resp = c.prewrite(req);
    assert!(resp.errors.is_empty(), "{resp:?}");
    let commit = c.ts();
    c.must_commit(&[b"a", b"b"], start, commit);
    assert_eq!(c.must_get(b"a", 0), Some(b"new".to_vec()));
    assert_eq!(c.must_get(b"b", 0), Some(b"new".to_vec()));
}

#[test]
fn a_pessimistic_rollback_releases_the_locks() {
    let c = Cluster::one();
    let start = c.ts();
    assert!(pessimistic_lock(&c, &[b"a", b"b"], start, start)
        .errors
        .is_empty());
    assert_eq!(c.must_scan_locks(b"", u64::MAX).len(), 2);
    let req = PessimisticRollbackRequest {
        context: c.ctx(b"a"),
        start_version: start,
        for_update_ts: start,
        keys: vec![b"a".to_vec(), b"b".to_vec()],
    };
    let resp = c.run(c.storage(1).kv_pessimistic_rollback(req)).unwrap();
    assert!(resp.errors.is_empty() && resp.region_error.is_none());
    assert!(c.must_scan_locks(b"", u64::MAX).is_empty());
    c.must_put(b"a", b"free");
    assert_eq!(c.must_get(b"a", 0), Some(b"free".to_vec()));
}

#[test]
fn a_one_phase_prewrite_commits_at_once_and_a_retry_is_answered_the_same() {
    let c = Cluster::one();
    let start = c.ts();
    let mut req = prewrite_req(&[(b"a", b"1"), (b"b", b"2")], start);
    req.try_one_pc = true;
    let first = c.prewrite(req.clone());
    assert!(first.errors.is_empty(), "{first:?}");
    let commit = first.one_pc_commit_ts;
    assert!(commit > start);
    assert!(c.must_scan_locks(b"", u64::MAX).is_empty());
    assert_eq!(c.must_get(b"a", commit), Some(b"1".to_vec()));
    assert_eq!(c.must_get(b"b", commit - 1), None);
    let retry = c.prewrite(req);
    assert_eq!((retry.errors.len(), retry.one_pc_commit_ts), (0, commit));
    assert_eq!(c.must_etcd_kv(b"a").unwrap().version, 1);
}

#[test]
fn a_one_phase_prewrite_above_its_max_commit_ts_writes_nothing() {
    let c = Cluster::one();
    let start = c.ts();
    // A reader far ahead forces the commit timestamp above the limit.
    c.must_get(b"a", later(start, 1000));
    let mut req = prewrite_req(&[(b"a", b"1")], start);
    req.try_one_pc = true;
    req.max_commit_ts = later(start, 500);
    let resp = c.prewrite(req);
    must_abort(&resp.errors.first().cloned(), "above max_commit_ts");
    assert_eq!(resp.one_pc_commit_ts, 0);
    assert!(c.must_scan_locks(b"", u64::MAX).is_empty());
    assert_eq!(c.must_get(b"a", 0), None);
}

#[test]
fn check_secondary_locks_reports_locks_commits_and_missing_keys() {
    let c = Cluster::one();
    let check = |keys: &[&[u8]], start: u64| {
        let req = CheckSecondaryLocksRequest {
            context: c.ctx(b"a"),
            keys: keys.iter().map(|k| k.to_vec()).collect(),
            start_version: start,
        };
        let resp = c.run(c.storage(1).kv_check_secondary_locks(req)).unwrap();
        must_ok(&resp.region_error, &resp.error);
        (lock_keys(&resp.locks), resp.commit_ts)
    };
    let start = c.ts();
    c.must_prewrite(&[(b"a", b"1"), (b"b", b"1")], start);
    assert_eq!(check(&[b"b"], start), (vec![(b"b".to_vec(), start)], 0));
    let commit = c.ts();
    c.must_commit(&[b"a", b"b"], start, commit);
    assert_eq!(check(&[b"b"], start), (vec![], commit));
    // A key never prewritten: the transaction can no longer commit it.
    let missing = c.ts();
    assert_eq!(check(&[b"c"], missing), (vec![], 0));
    let resp = c.prewrite(prewrite_req(&[(b"c", b"1")], missing));
    assert!(resp.errors[0].conflict.is_some(), "{resp:?}");
}
