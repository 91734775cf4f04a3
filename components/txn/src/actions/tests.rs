//! Flows of the Percolator actions against a `MemoryEngine`.

use super::*;
use crate::reader::TxnCommitRecord;
use crate::test_util::*;
use crate::types::{compose_ts, SHORT_VALUE_MAX_LEN};
use atoll_engine::memory::MemoryEngine;
use atoll_engine::{Peekable, CF_DEFAULT};

fn engine() -> MemoryEngine {
    MemoryEngine::new()
}

fn default_value(e: &MemoryEngine, key: &[u8], start_ts: u64) -> Option<Vec<u8>> {
    e.get_value_cf(CF_DEFAULT, &crate::types::default_key(key, start_ts))
        .unwrap()
}

#[test]
fn prewrite_commit_short_and_big_values() {
    let e = engine();
    must_prewrite_put(&e, b"k1", b"v1", b"k1", 10);
    must_prewrite_put(&e, b"k2", &big(b'b'), b"k1", 10);
    let l1 = must_locked(&e, b"k1", 10);
    assert_eq!(l1.short_value, Some(b"v1".to_vec()));
    assert_eq!(l1.min_commit_ts, 11);
    let l2 = must_locked(&e, b"k2", 10);
    assert_eq!(l2.short_value, None);
    assert_eq!(default_value(&e, b"k2", 10), Some(big(b'b')));

    // Readers: below start_ts see nothing and are not blocked; above it are blocked.
    assert_eq!(must_get(&e, b"k1", 9), None);
    assert_eq!(must_get(&e, b"k1", 10), None);
    assert!(matches!(
        reader(&e).get(b"k1", 15, &[]),
        Err(Error::KeyIsLocked(ref i)) if i.lock_version == 10 && i.primary_lock == b"k1"
    ));

    must_commit(&e, b"k1", 10, 20);
    must_commit(&e, b"k2", 10, 20);
    must_unlocked(&e, b"k1");
    must_unlocked(&e, b"k2");
    must_written(&e, b"k1", 10, 20, WriteType::Put);
    assert_eq!(must_get(&e, b"k1", 19), None);
    assert_eq!(must_get(&e, b"k1", 20), Some(b"v1".to_vec()));
    assert_eq!(must_get(&e, b"k2", 20), Some(big(b'b')));
    assert_eq!(must_get(&e, b"k2", u64::MAX), Some(big(b'b')));
    // Commit is idempotent once committed.
    must_commit(&e, b"k1", 10, 20);

    // Exactly at the short value boundary the value stays inline.
    must_prewrite_put(&e, b"k3", &[7; SHORT_VALUE_MAX_LEN], b"k3", 30);
    assert!(must_locked(&e, b"k3", 30).short_value.is_some());
    assert_eq!(default_value(&e, b"k3", 30), None);
}

#[test]
fn prewrite_is_idempotent_and_respects_other_locks() {
    let e = engine();
    must_prewrite_put(&e, b"k", b"v", b"k", 10);
    let before = must_locked(&e, b"k", 10);
    assert_eq!(
        try_prewrite(&e, &params(b"k", 10), Op::Put, b"k", b"v", false).unwrap(),
        0
    );
    assert_eq!(must_locked(&e, b"k", 10), before);

    let err = try_prewrite(&e, &params(b"p", 11), Op::Put, b"k", b"x", false).unwrap_err();
    match err {
        Error::KeyIsLocked(info) => {
            assert_eq!(info.key, b"k");
            assert_eq!(info.lock_version, 10);
            assert_eq!(info.lock_type, Op::Put as i32);
        }
        e => panic!("{e:?}"),
    }
    // Unsupported ops.
    assert!(matches!(
        try_prewrite(&e, &params(b"k", 12), Op::Rollback, b"z", b"", false),
        Err(Error::Other(_))
    ));
}

#[test]
fn delete_and_lock_mutations() {
    let e = engine();
    must_prewrite_put(&e, b"k", b"v", b"k", 5);
    must_commit(&e, b"k", 5, 6);
    must_prewrite_lock(&e, b"k", b"k", 10);
    must_commit(&e, b"k", 10, 11);
    must_written(&e, b"k", 10, 11, WriteType::Lock);
    assert_eq!(must_get(&e, b"k", 12), Some(b"v".to_vec()));
    // A Lock-type lock does not block readers.
    must_prewrite_lock(&e, b"k", b"k", 13);
    assert_eq!(must_get(&e, b"k", 20), Some(b"v".to_vec()));
    must_rollback(&e, b"k", 13, false);
    must_prewrite_delete(&e, b"k", b"k", 20);
    must_commit(&e, b"k", 20, 21);
    must_written(&e, b"k", 20, 21, WriteType::Delete);
    assert_eq!(must_get(&e, b"k", 21), None);
    assert_eq!(must_get(&e, b"k", 20), Some(b"v".to_vec()));
}

#[test]
fn write_conflict() {
    let e = engine();
    must_prewrite_put(&e, b"k", b"v1", b"k", 10);
    must_commit(&e, b"k", 10, 20);
    // Started before the commit: conflict.
    let err = try_prewrite(&e, &params(b"p", 15), Op::Put, b"k", b"v2", false).unwrap_err();
    assert_eq!(
        err,
        Error::WriteConflict {
            start_ts: 15,
            conflict_start_ts: 10,
            conflict_commit_ts: 20,
            key: b"k".to_vec(),
            primary: b"p".to_vec(),
        }
    );
    must_unlocked(&e, b"k");
    // Lock-only mutations conflict too.
    assert!(matches!(
        try_prewrite(&e, &params(b"p", 15), Op::Lock, b"k", b"", false),
        Err(Error::WriteConflict { .. })
    ));
    // Started after the commit: fine.
    must_prewrite_put(&e, b"k", b"v3", b"k", 25);
    must_commit(&e, b"k", 25, 30);
    assert_eq!(must_get(&e, b"k", 30), Some(b"v3".to_vec()));

    // A rollback record of another transaction newer than start_ts also conflicts (TiKV).
    must_rollback(&e, b"r", 40, false);
    assert!(matches!(
        try_prewrite(&e, &params(b"r", 35), Op::Put, b"r", b"x", false),
        Err(Error::WriteConflict {
            conflict_commit_ts: 40,
            ..
        })
    ));
}

#[test]
fn late_duplicate_prewrite_after_commit_reports_committed() {
    let e = engine();
    must_prewrite_put(&e, b"k", b"v", b"k", 10);
    must_commit(&e, b"k", 10, 20);
    let err = try_prewrite(&e, &params(b"k", 10), Op::Put, b"k", b"v", false).unwrap_err();
    assert!(matches!(
        err,
        Error::Committed {
            start_ts: 10,
            commit_ts: 20,
            ..
        }
    ));
    must_unlocked(&e, b"k");
}

#[test]
fn commit_errors() {
    let e = engine();
    // Never prewritten.
    assert!(matches!(
        try_commit(&e, b"k", 10, 20),
        Err(Error::TxnLockNotFound {
            start_ts: 10,
            commit_ts: 20,
            ..
        })
    ));
    // Rolled back.
    must_prewrite_put(&e, b"k", b"v", b"k", 10);
    must_rollback(&e, b"k", 10, false);
    assert!(matches!(
        try_commit(&e, b"k", 10, 20),
        Err(Error::TxnLockNotFound { .. })
    ));
    // Another transaction's lock.
    must_prewrite_put(&e, b"k", b"v", b"k", 30);
    assert!(matches!(
        try_commit(&e, b"k", 29, 40),
        Err(Error::TxnLockNotFound { .. })
    ));
    // Below min_commit_ts.
    assert_eq!(
        try_commit(&e, b"k", 30, 30),
        Err(Error::CommitTsExpired {
            start_ts: 30,
            commit_ts: 30,
            key: b"k".to_vec(),
            min_commit_ts: 31
        })
    );
    must_locked(&e, b"k", 30);
    must_commit(&e, b"k", 30, 31);
    let ke = try_commit(&e, b"x", 1, 2).unwrap_err().to_key_error();
    assert!(ke.txn_lock_not_found.is_some());
}

#[test]
fn rollback_flows() {
    let e = engine();
    must_prewrite_put(&e, b"k", &big(b'r'), b"k", 10);
    assert!(default_value(&e, b"k", 10).is_some());
    must_rollback(&e, b"k", 10, false);
    must_unlocked(&e, b"k");
    assert_eq!(default_value(&e, b"k", 10), None);
    must_rolled_back(&e, b"k", 10, false);
    // Idempotent.
    must_rollback(&e, b"k", 10, false);
    // A late prewrite of the rolled back transaction fails.
    let err = try_prewrite(&e, &params(b"k", 10), Op::Put, b"k", b"v", false).unwrap_err();
    assert!(matches!(
        err,
        Error::WriteConflict {
            start_ts: 10,
            conflict_start_ts: 10,
            ..
        }
    ));
    must_unlocked(&e, b"k");

    // Rolling back a committed transaction is refused.
    must_prewrite_put(&e, b"k", b"v", b"k", 20);
    must_commit(&e, b"k", 20, 25);
    assert_eq!(
        try_rollback(&e, b"k", 20, false),
        Err(Error::Committed {
            start_ts: 20,
            commit_ts: 25,
            key: b"k".to_vec()
        })
    );
    assert_eq!(must_get(&e, b"k", 30), Some(b"v".to_vec()));

    // No lock at all: a rollback record is still written (protected on request).
    must_rollback(&e, b"n", 40, true);
    must_rolled_back(&e, b"n", 40, true);
    // An unprotected rollback collapses the previous unprotected one, never a protected one.
    must_rollback(&e, b"n", 50, false);
    must_rolled_back(&e, b"n", 40, true);
    must_rolled_back(&e, b"n", 50, false);
    must_rollback(&e, b"n", 60, false);
    must_no_write_at(&e, b"n", 50);
    must_rolled_back(&e, b"n", 60, false);
    // Rolling back another transaction's lock leaves the lock alone.
    must_prewrite_put(&e, b"m", b"v", b"m", 70);
    must_rollback(&e, b"m", 65, false);
    must_locked(&e, b"m", 70);
    must_rolled_back(&e, b"m", 65, false);
}

#[test]
fn cleanup_checks_ttl() {
    let e = engine();
    let start = compose_ts(1000, 0);
    must_prewrite_put(&e, b"k", b"v", b"k", start);
    // TTL 3000 ms: alive at 3500 ms, expired at 4001 ms.
    let alive = run(&e, start, |txn, r| {
        cleanup(txn, r, b"k", compose_ts(3500, 0), false)
    });
    assert!(matches!(alive, Err(Error::KeyIsLocked(_))));
    must_locked(&e, b"k", start);
    run(&e, start, |txn, r| {
        cleanup(txn, r, b"k", compose_ts(4001, 0), false)
    })
    .unwrap();
    must_unlocked(&e, b"k");
    must_rolled_back(&e, b"k", start, false);
}

#[test]
fn check_txn_status_ttl_expiry() {
    let e = engine();
    let ts = compose_ts(1000, 1);
    must_prewrite_put(&e, b"pk", &big(b'z'), b"pk", ts);
    // Alive.
    let st = try_check_txn_status(&e, b"pk", ts, 0, compose_ts(2000, 0), false).unwrap();
    assert!(matches!(
        st,
        TxnStatus::Locked {
            ttl: 3000,
            min_commit_ts_pushed: false,
            ..
        }
    ));
    assert_eq!(st.action(), Action::NoAction);
    // Expired: rolled back now.
    let st = try_check_txn_status(&e, b"pk", ts, 0, compose_ts(4001, 0), false).unwrap();
    assert_eq!(st, TxnStatus::TtlExpire);
    assert_eq!(st.action(), Action::TtlExpireRollback);
    must_unlocked(&e, b"pk");
    assert_eq!(default_value(&e, b"pk", ts), None);
    must_rolled_back(&e, b"pk", ts, false);
    // And then it reads as rolled back.
    let st = try_check_txn_status(&e, b"pk", ts, 0, compose_ts(5000, 0), false).unwrap();
    assert_eq!(st, TxnStatus::RolledBack);
    assert!(try_commit(&e, b"pk", ts, ts + 10)
        .unwrap_err()
        .to_key_error()
        .txn_lock_not_found
        .is_some());
}

#[test]
fn check_txn_status_pushes_min_commit_ts() {
    let e = engine();
    let ts = compose_ts(1000, 0);
    must_prewrite_put(&e, b"pk", b"v", b"pk", ts);
    let caller = compose_ts(1500, 0);
    // The reader at `caller` is blocked ...
    assert!(matches!(
        reader(&e).get(b"pk", caller, &[]),
        Err(Error::KeyIsLocked(_))
    ));
    let st = try_check_txn_status(&e, b"pk", ts, caller, compose_ts(1200, 0), false).unwrap();
    match &st {
        TxnStatus::Locked {
            min_commit_ts,
            min_commit_ts_pushed,
            lock_info,
            ..
        } => {
            assert_eq!(*min_commit_ts, caller + 1);
            assert!(*min_commit_ts_pushed);
            assert_eq!(lock_info.min_commit_ts, caller + 1);
        }
        s => panic!("{s:?}"),
    }
    assert_eq!(st.action(), Action::MinCommitTsPushed);
    assert_eq!(must_locked(&e, b"pk", ts).min_commit_ts, caller + 1);
    // ... and no longer once pushed.
    assert_eq!(must_get(&e, b"pk", caller), None);
    // current_ts above caller_start_ts wins.
    let caller2 = compose_ts(1600, 0);
    let now = compose_ts(1700, 0);
    try_check_txn_status(&e, b"pk", ts, caller2, now, false).unwrap();
    assert_eq!(must_locked(&e, b"pk", ts).min_commit_ts, now);
    // A caller below min_commit_ts changes nothing but is told it may bypass.
    let st = try_check_txn_status(&e, b"pk", ts, caller, now, false).unwrap();
    assert!(matches!(
        st,
        TxnStatus::Locked {
            min_commit_ts_pushed: true,
            ..
        }
    ));
    assert_eq!(must_locked(&e, b"pk", ts).min_commit_ts, now);
    // u64::MAX caller: no push, but may bypass; 0 caller: no push, no bypass.
    let st = try_check_txn_status(&e, b"pk", ts, u64::MAX, now, false).unwrap();
    assert!(matches!(
        st,
        TxnStatus::Locked {
            min_commit_ts_pushed: true,
            ..
        }
    ));
    let st = try_check_txn_status(&e, b"pk", ts, 0, now, false).unwrap();
    assert!(matches!(
        st,
        TxnStatus::Locked {
            min_commit_ts_pushed: false,
            ..
        }
    ));
    assert_eq!(must_locked(&e, b"pk", ts).min_commit_ts, now);

    // The committer must now commit above the pushed min_commit_ts.
    assert!(matches!(
        try_commit(&e, b"pk", ts, now - 1),
        Err(Error::CommitTsExpired { .. })
    ));
    must_commit(&e, b"pk", ts, now);
    let st = try_check_txn_status(&e, b"pk", ts, caller, now, false).unwrap();
    assert_eq!(st, TxnStatus::Committed { commit_ts: now });
}

#[test]
fn check_txn_status_missing_lock_and_protected_rollback() {
    let e = engine();
    // Without rollback_if_not_exist: TxnNotFound.
    let err = try_check_txn_status(&e, b"pk", 10, 15, 20, false).unwrap_err();
    assert_eq!(
        err,
        Error::TxnNotFound {
            start_ts: 10,
            key: b"pk".to_vec()
        }
    );
    assert!(err.to_key_error().txn_not_found.is_some());
    // With it: a protected rollback is written.
    let st = try_check_txn_status(&e, b"pk", 10, 15, 20, true).unwrap();
    assert_eq!(st, TxnStatus::LockNotExistRollback);
    assert_eq!(st.action(), Action::LockNotExistRollback);
    must_rolled_back(&e, b"pk", 10, true);
    // The transaction's late prewrite fails ...
    assert!(matches!(
        try_prewrite(&e, &params(b"pk", 10), Op::Put, b"pk", b"v", false),
        Err(Error::WriteConflict { .. })
    ));
    must_unlocked(&e, b"pk");
    // ... even after an unprotected rollback of a later transaction on the same key.
    must_rollback(&e, b"pk", 12, false);
    must_rolled_back(&e, b"pk", 10, true);
    let st = try_check_txn_status(&e, b"pk", 10, 15, 20, true).unwrap();
    assert_eq!(st, TxnStatus::RolledBack);
    // A pessimistic lock of the rolled back transaction cannot be taken either.
    must_rollback(&e, b"q", 30, true);
    let err = run(&e, 30, |txn, r| {
        acquire_pessimistic_lock(txn, r, b"q", b"q", 30, 30, 3000, false)
    })
    .unwrap_err();
    assert!(matches!(
        err,
        Error::PessimisticLockRolledBack { start_ts: 30, .. }
    ));
}

#[test]
fn check_txn_status_leaves_async_commit_locks() {
    let e = engine();
    let ts = compose_ts(1000, 0);
    let mut p = params(b"pk", ts);
    p.use_async_commit = true;
    p.secondaries = vec![b"s".to_vec()];
    try_prewrite(&e, &p, Op::Put, b"pk", b"v", false).unwrap();
    let st = try_check_txn_status(&e, b"pk", ts, ts + 5, compose_ts(99_999, 0), true).unwrap();
    assert!(matches!(
        st,
        TxnStatus::Locked {
            min_commit_ts_pushed: false,
            ..
        }
    ));
    let lock = must_locked(&e, b"pk", ts);
    assert_eq!(lock.min_commit_ts, ts + 1, "not pushed");
    assert_eq!(lock.secondaries, vec![b"s".to_vec()]);
}

#[test]
fn one_phase_commit() {
    let e = engine();
    must_prewrite_put(&e, b"c", b"old", b"c", 1);
    must_commit(&e, b"c", 1, 2);
    let mut p = params(b"a", 10);
    p.one_pc = true;
    p.min_commit_ts = 30; // max_ts + 1, as the caller computes it
    let mut max_min_commit_ts = 0;
    let reader = reader(&e);
    let mut txn = MvccTxn::new(10);
    for (op, k, v) in [
        (Op::Put, &b"a"[..], &b"va"[..]),
        (Op::Put, b"b", &big(b'B')),
        (Op::Del, b"c", b""),
        (Op::Lock, b"d", b""),
    ] {
        let m = prewrite(&mut txn, &reader, &p, (op, k, v), false).unwrap();
        max_min_commit_ts = max_min_commit_ts.max(m);
    }
    assert_eq!(max_min_commit_ts, 30);
    assert_eq!(txn.one_pc_locks().len(), 4);
    // Only the big value has been buffered; nothing in CF_LOCK.
    assert!(txn.modifies().iter().all(|m| m.cf() == CF_DEFAULT));
    txn.commit_one_pc(&reader, max_min_commit_ts).unwrap();
    must_apply(&e, txn.into_modifies());
    for k in [&b"a"[..], b"b", b"c", b"d"] {
        must_unlocked(&e, k);
    }
    assert_eq!(must_get(&e, b"a", 30), Some(b"va".to_vec()));
    assert_eq!(must_get(&e, b"a", 29), None);
    assert_eq!(must_get(&e, b"b", 30), Some(big(b'B')));
    assert_eq!(must_get(&e, b"c", 30), None);
    assert_eq!(must_get(&e, b"c", 29), Some(b"old".to_vec()));
    must_written(&e, b"d", 10, 30, WriteType::Lock);

    // A retried one-phase prewrite after success reports the commit.
    let err = try_prewrite(&e, &p, Op::Put, b"a", b"va", false).unwrap_err();
    assert!(matches!(err, Error::Committed { commit_ts: 30, .. }));

    // max_commit_ts too small: refuse (the caller falls back to 2PC).
    let mut p2 = params(b"x", 40);
    p2.one_pc = true;
    p2.min_commit_ts = 50;
    p2.max_commit_ts = 45;
    assert_eq!(
        try_prewrite(&e, &p2, Op::Put, b"x", b"v", false),
        Err(Error::CommitTsTooLarge {
            start_ts: 40,
            min_commit_ts: 50,
            max_commit_ts: 45
        })
    );
    // Conflicts are detected as in 2PC.
    let mut p3 = params(b"a", 20);
    p3.one_pc = true;
    assert!(matches!(
        try_prewrite(&e, &p3, Op::Put, b"a", b"v", false),
        Err(Error::WriteConflict { .. })
    ));
}

#[test]
fn one_phase_commit_of_a_pessimistic_transaction() {
    let e = engine();
    must_acquire_pessimistic_lock(&e, b"k", b"k", 10, 12);
    let mut p = params(b"k", 10);
    p.for_update_ts = 12;
    p.one_pc = true;
    let r = reader(&e);
    let mut txn = MvccTxn::new(10);
    let m = prewrite(&mut txn, &r, &p, (Op::Put, b"k", b"v"), true).unwrap();
    assert_eq!(m, 13, "above for_update_ts");
    txn.commit_one_pc(&r, m).unwrap();
    must_apply(&e, txn.into_modifies());
    must_unlocked(&e, b"k");
    assert_eq!(must_get(&e, b"k", 13), Some(b"v".to_vec()));
}

#[test]
fn async_commit_and_check_secondary_locks() {
    let e = engine();
    let mut p = params(b"pk", 10);
    p.use_async_commit = true;
    p.secondaries = vec![b"s1".to_vec(), b"s2".to_vec()];
    p.min_commit_ts = 15;
    assert_eq!(
        try_prewrite(&e, &p, Op::Put, b"pk", b"v", false).unwrap(),
        15
    );
    assert_eq!(
        try_prewrite(&e, &p, Op::Put, b"s1", b"v1", false).unwrap(),
        15
    );
    // Duplicate prewrite returns the stored min_commit_ts.
    assert_eq!(
        try_prewrite(&e, &p, Op::Put, b"s1", b"v1", false).unwrap(),
        15
    );
    let primary = must_locked(&e, b"pk", 10);
    assert!(primary.use_async_commit);
    assert_eq!(primary.secondaries, p.secondaries);
    assert!(must_locked(&e, b"s1", 10).secondaries.is_empty());
    // A reader at 14 is not blocked (min_commit_ts 15); at 15 it is.
    assert_eq!(must_get(&e, b"s1", 14), None);
    assert!(matches!(
        reader(&e).get(b"s1", 15, &[]),
        Err(Error::KeyIsLocked(_))
    ));

    // Both prewritten secondaries are locked; s2 has not been prewritten: rolled back.
    let keys = vec![b"s1".to_vec()];
    let st = run(&e, 10, |txn, r| check_secondary_locks(txn, r, &keys, 10)).unwrap();
    match st {
        SecondaryLocksStatus::Locked(locks) => {
            assert_eq!(locks.len(), 1);
            assert_eq!(locks[0].key, b"s1");
            assert_eq!(locks[0].min_commit_ts, 15);
        }
        s => panic!("{s:?}"),
    }
    let keys = vec![b"s1".to_vec(), b"s2".to_vec()];
    let st = run(&e, 10, |txn, r| check_secondary_locks(txn, r, &keys, 10)).unwrap();
    assert_eq!(st, SecondaryLocksStatus::RolledBack);
    must_rolled_back(&e, b"s2", 10, true);
    // s2's late prewrite is now impossible, so the transaction can never commit.
    assert!(try_prewrite(&e, &p, Op::Put, b"s2", b"v2", false).is_err());

    // Another transaction: committed secondary is reported.
    let mut p = params(b"tp", 20);
    p.use_async_commit = true;
    p.secondaries = vec![b"t1".to_vec(), b"t2".to_vec()];
    for k in [&b"tp"[..], b"t1", b"t2"] {
        try_prewrite(&e, &p, Op::Put, k, b"x", false).unwrap();
    }
    must_commit(&e, b"t1", 20, 25);
    let keys = vec![b"t2".to_vec(), b"t1".to_vec()];
    let st = run(&e, 20, |txn, r| check_secondary_locks(txn, r, &keys, 20)).unwrap();
    // t2 is still locked, but t1 being committed decides.
    assert_eq!(st, SecondaryLocksStatus::Committed(25));
    must_locked(&e, b"t2", 20);
}

#[test]
fn check_secondary_locks_rolls_back_pessimistic_locks() {
    let e = engine();
    must_acquire_pessimistic_lock(&e, b"s", b"pk", 10, 10);
    let keys = vec![b"s".to_vec()];
    let st = run(&e, 10, |txn, r| check_secondary_locks(txn, r, &keys, 10)).unwrap();
    assert_eq!(st, SecondaryLocksStatus::RolledBack);
    must_unlocked(&e, b"s");
    must_rolled_back(&e, b"s", 10, true);
}

#[test]
fn pessimistic_lock_then_prewrite_then_commit() {
    let e = engine();
    must_prewrite_put(&e, b"k", b"v0", b"k", 1);
    must_commit(&e, b"k", 1, 2);
    // Acquire at for_update_ts 12, returning the current value.
    let v = run(&e, 10, |txn, r| {
        acquire_pessimistic_lock(txn, r, b"k", b"k", 10, 12, 3000, true)
    })
    .unwrap();
    assert_eq!(v, Some(b"v0".to_vec()));
    let lock = must_locked(&e, b"k", 10);
    assert_eq!(lock.lock_type, LockType::Pessimistic);
    assert_eq!(lock.for_update_ts, 12);
    // Pessimistic locks do not block readers, but do block writers.
    assert_eq!(must_get(&e, b"k", 100), Some(b"v0".to_vec()));
    assert!(matches!(
        try_prewrite(&e, &params(b"o", 11), Op::Put, b"k", b"x", false),
        Err(Error::KeyIsLocked(_))
    ));
    let err = run(&e, 11, |txn, r| {
        acquire_pessimistic_lock(txn, r, b"k", b"o", 11, 13, 3000, false)
    })
    .unwrap_err();
    assert!(matches!(err, Error::KeyIsLocked(ref i) if i.lock_type == Op::PessimisticLock as i32));
    // Plain writes are refused too.
    assert!(matches!(
        run(&e, 50, |txn, r| plain_write(
            txn,
            r,
            b"k",
            Some(b"p".to_vec()),
            0,
            51
        )),
        Err(Error::KeyIsLocked(_))
    ));
    // Re-acquiring refreshes for_update_ts.
    must_acquire_pessimistic_lock(&e, b"k", b"k", 10, 14);
    assert_eq!(must_locked(&e, b"k", 10).for_update_ts, 14);
    // Committing a pessimistic lock is refused.
    assert!(matches!(
        try_commit(&e, b"k", 10, 20),
        Err(Error::LockTypeNotMatch {
            pessimistic: true,
            ..
        })
    ));
    // An optimistic prewrite meeting its own pessimistic lock is refused.
    assert!(matches!(
        try_prewrite(&e, &params(b"k", 10), Op::Put, b"k", b"v", false),
        Err(Error::LockTypeNotMatch { .. })
    ));

    let mut p = params(b"k", 10);
    p.for_update_ts = 14;
    assert_eq!(
        try_prewrite(&e, &p, Op::Put, b"k", &big(b'p'), true).unwrap(),
        0
    );
    let lock = must_locked(&e, b"k", 10);
    assert_eq!(lock.lock_type, LockType::Put);
    assert_eq!(lock.for_update_ts, 14);
    // Acquiring again after prewrite is a type mismatch.
    let err = run(&e, 10, |txn, r| {
        acquire_pessimistic_lock(txn, r, b"k", b"k", 10, 15, 3000, false)
    })
    .unwrap_err();
    assert!(matches!(
        err,
        Error::LockTypeNotMatch {
            pessimistic: false,
            ..
        }
    ));
    must_commit(&e, b"k", 10, 20);
    assert_eq!(must_get(&e, b"k", 20), Some(big(b'p')));

    // A non-locked key of a pessimistic transaction is checked like an optimistic one.
    must_prewrite_put(&e, b"free", b"x", b"free", 30);
    must_commit(&e, b"free", 30, 35);
    let mut p = params(b"k", 32);
    p.for_update_ts = 40;
    assert!(matches!(
        try_prewrite(&e, &p, Op::Put, b"free", b"y", false),
        Err(Error::WriteConflict { .. })
    ));
}

#[test]
fn pessimistic_errors_and_rollback() {
    let e = engine();
    must_prewrite_put(&e, b"k", b"v", b"k", 10);
    must_commit(&e, b"k", 10, 20);
    // A write after for_update_ts: conflict.
    let err = run(&e, 15, |txn, r| {
        acquire_pessimistic_lock(txn, r, b"k", b"p", 15, 18, 3000, false)
    })
    .unwrap_err();
    assert!(matches!(
        err,
        Error::WriteConflict {
            conflict_start_ts: 10,
            conflict_commit_ts: 20,
            ..
        }
    ));
    // Pessimistic prewrite without the lock.
    let mut p = params(b"p", 15);
    p.for_update_ts = 25;
    assert_eq!(
        try_prewrite(&e, &p, Op::Put, b"k", b"x", true),
        Err(Error::PessimisticLockNotFound {
            start_ts: 15,
            key: b"k".to_vec()
        })
    );
    // Optimistic transactions cannot claim pessimistic locks.
    assert!(matches!(
        try_prewrite(&e, &params(b"p", 15), Op::Put, b"k", b"x", true),
        Err(Error::Other(_))
    ));
    // Another transaction's lock where a pessimistic lock is expected.
    must_prewrite_put(&e, b"o", b"v", b"o", 30);
    let mut p = params(b"p", 31);
    p.for_update_ts = 31;
    assert!(matches!(
        try_prewrite(&e, &p, Op::Put, b"o", b"x", true),
        Err(Error::PessimisticLockNotFound { .. })
    ));

    // Pessimistic rollback only removes our pessimistic lock taken at or below for_update_ts.
    must_acquire_pessimistic_lock(&e, b"pr", b"pr", 40, 45);
    run(&e, 40, |txn, r| pessimistic_rollback(txn, r, b"pr", 40, 44)).unwrap();
    must_locked(&e, b"pr", 40);
    run(&e, 39, |txn, r| pessimistic_rollback(txn, r, b"pr", 39, 50)).unwrap();
    must_locked(&e, b"pr", 40);
    run(&e, 40, |txn, r| pessimistic_rollback(txn, r, b"pr", 40, 45)).unwrap();
    must_unlocked(&e, b"pr");
    must_no_write_at(&e, b"pr", 40);
    run(&e, 40, |txn, r| pessimistic_rollback(txn, r, b"pr", 40, 45)).unwrap();

    // Rolling back the primary of a pessimistic transaction leaves a protected record.
    must_acquire_pessimistic_lock(&e, b"pp", b"pp", 50, 50);
    must_rollback(&e, b"pp", 50, false);
    must_rolled_back(&e, b"pp", 50, true);
    // ... a secondary's is not protected.
    must_acquire_pessimistic_lock(&e, b"ps", b"pp", 60, 60);
    must_rollback(&e, b"ps", 60, false);
    must_rolled_back(&e, b"ps", 60, false);
    // for_update_ts below start_ts is invalid.
    assert!(matches!(
        run(&e, 70, |txn, r| acquire_pessimistic_lock(
            txn, r, b"z", b"z", 70, 69, 1, false
        )),
        Err(Error::Other(_))
    ));
}

#[test]
fn resolve_lock_commits_or_rolls_back() {
    let e = engine();
    must_prewrite_put(&e, b"a", b"va", b"a", 10);
    must_prewrite_put(&e, b"b", &big(b'b'), b"a", 10);
    must_acquire_pessimistic_lock(&e, b"c", b"a", 10, 10);
    run(&e, 10, |txn, r| {
        for k in [&b"a"[..], b"b", b"c"] {
            resolve_lock(txn, r, k, 10, 20)?;
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(must_get(&e, b"a", 20), Some(b"va".to_vec()));
    assert_eq!(must_get(&e, b"b", 20), Some(big(b'b')));
    must_unlocked(&e, b"c");
    must_no_write_at(&e, b"c", 20);

    must_prewrite_put(&e, b"a", b"x", b"a", 30);
    must_prewrite_put(&e, b"b", &big(b'x'), b"a", 30);
    run(&e, 30, |txn, r| {
        resolve_lock(txn, r, b"a", 30, 0)?;
        resolve_lock(txn, r, b"b", 30, 0)
    })
    .unwrap();
    must_unlocked(&e, b"a");
    must_unlocked(&e, b"b");
    must_rolled_back(&e, b"a", 30, false);
    assert_eq!(default_value(&e, b"b", 30), None);
    assert_eq!(must_get(&e, b"b", 40), Some(big(b'b')));
    // Resolving to commit a rolled back key fails.
    assert!(matches!(
        run(&e, 30, |txn, r| resolve_lock(txn, r, b"a", 30, 35)),
        Err(Error::TxnLockNotFound { .. })
    ));
}

#[test]
fn heart_beat() {
    let e = engine();
    must_prewrite_put(&e, b"pk", b"v", b"pk", 10);
    let ttl = run(&e, 10, |txn, r| txn_heart_beat(txn, r, b"pk", 10, 5000)).unwrap();
    assert_eq!(ttl, 5000);
    assert_eq!(must_locked(&e, b"pk", 10).ttl, 5000);
    let ttl = run(&e, 10, |txn, r| txn_heart_beat(txn, r, b"pk", 10, 4000)).unwrap();
    assert_eq!(ttl, 5000, "never shrinks");
    assert!(matches!(
        run(&e, 11, |txn, r| txn_heart_beat(txn, r, b"pk", 11, 4000)),
        Err(Error::TxnNotFound { start_ts: 11, .. })
    ));
}

#[test]
fn plain_writes() {
    let e = engine();
    run(&e, 9, |txn, r| {
        plain_write(txn, r, b"k", Some(b"v".to_vec()), 0, 10)
    })
    .unwrap();
    assert_eq!(must_get(&e, b"k", 10), Some(b"v".to_vec()));
    run(&e, 19, |txn, r| {
        plain_write(txn, r, b"k", Some(big(b'g')), 0, 20)
    })
    .unwrap();
    assert_eq!(must_get(&e, b"k", 20), Some(big(b'g')));
    assert_eq!(default_value(&e, b"k", 19), Some(big(b'g')));
    run(&e, 29, |txn, r| plain_write(txn, r, b"k", None, 0, 30)).unwrap();
    assert_eq!(must_get(&e, b"k", 30), None);
    assert_eq!(must_get(&e, b"k", 25), Some(big(b'g')));
    assert_eq!(reader(&e).latest_commit_ts(b"k").unwrap(), Some(30));
    // A Lock-type lock blocks plain writes too (any lock does).
    must_prewrite_lock(&e, b"k", b"k", 40);
    assert!(matches!(
        run(&e, 41, |txn, r| plain_write(txn, r, b"k", None, 0, 42)),
        Err(Error::KeyIsLocked(_))
    ));
    assert!(matches!(
        run(&e, 50, |txn, r| plain_write(txn, r, b"z", None, 0, 50)),
        Err(Error::Other(_))
    ));
}

/// Every write path keeps etcd's key metadata: create timestamp, version (writes since the key
/// last did not exist) and lease — plain writes, two-phase commits, one-phase commits.
#[test]
fn write_paths_keep_key_metadata() {
    let e = engine();
    let meta = |key: &[u8], ts: u64| {
        reader(&e)
            .get_with_meta(key, ts, &[], true)
            .unwrap()
            .map(|(_, m)| m)
    };
    run(&e, 9, |txn, r| {
        plain_write(txn, r, b"k", Some(b"a".to_vec()), 7, 10)
    })
    .unwrap();
    let m = meta(b"k", u64::MAX).unwrap();
    assert_eq!((m.create_ts, m.mod_ts, m.version, m.lease), (10, 10, 1, 7));
    // Two phases: prewrite, a rollback record of someone else in between, commit.
    must_prewrite_put(&e, b"k", &big(b'b'), b"k", 20);
    must_commit(&e, b"k", 20, 21);
    let m = meta(b"k", u64::MAX).unwrap();
    assert_eq!((m.create_ts, m.mod_ts, m.version, m.lease), (10, 21, 2, 0));
    // A lock-only record does not count as a write.
    must_prewrite_lock(&e, b"k", b"k", 30);
    must_commit(&e, b"k", 30, 31);
    assert_eq!(meta(b"k", u64::MAX).unwrap().version, 2);
    // One phase.
    let mut p = params(b"k", 40);
    p.one_pc = true;
    let r = reader(&e);
    let mut txn = MvccTxn::new(40);
    let m = prewrite_with_lease(&mut txn, &r, &p, (Op::Put, b"k", b"c"), 9, false).unwrap();
    txn.commit_one_pc(&r, m.max(41)).unwrap();
    must_apply(&e, txn.into_modifies());
    let m = meta(b"k", u64::MAX).unwrap();
    assert_eq!((m.create_ts, m.version, m.lease), (10, 3, 9));
    // Deleted, then created again: a new history.
    run(&e, 49, |txn, r| plain_write(txn, r, b"k", None, 0, 50)).unwrap();
    assert_eq!(meta(b"k", u64::MAX), None);
    run(&e, 59, |txn, r| {
        plain_write(txn, r, b"k", Some(b"d".to_vec()), 0, 60)
    })
    .unwrap();
    let m = meta(b"k", u64::MAX).unwrap();
    assert_eq!((m.create_ts, m.mod_ts, m.version), (60, 60, 1));
    // Older versions keep theirs.
    assert_eq!(meta(b"k", 21).unwrap().version, 2);
    // And scans report the same.
    let scanned = reader(&e)
        .scan_with_meta(b"", b"", 0, u64::MAX, false, false, &[])
        .unwrap();
    assert_eq!(scanned.len(), 1);
    assert_eq!(scanned[0].2, meta(b"k", u64::MAX).unwrap());
    assert_eq!(reader(&e).count(b"", b"", u64::MAX, &[]).unwrap(), 1);
    assert_eq!(reader(&e).count(b"", b"", 55, &[]).unwrap(), 0);
}

#[test]
fn check_not_exists() {
    let e = engine();
    must_prewrite_put(&e, b"k", b"v", b"k", 10);
    must_commit(&e, b"k", 10, 11);
    let p = params(b"k", 20);
    assert_eq!(
        try_prewrite(&e, &p, Op::CheckNotExists, b"k", b"", false),
        Err(Error::AlreadyExist { key: b"k".to_vec() })
    );
    assert_eq!(
        try_prewrite(&e, &p, Op::CheckNotExists, b"nope", b"", false),
        Ok(0)
    );
    must_unlocked(&e, b"nope");
    // Deleted (with a lock record on top): does not exist.
    must_prewrite_delete(&e, b"k", b"k", 12);
    must_commit(&e, b"k", 12, 13);
    must_prewrite_lock(&e, b"k", b"k", 14);
    must_commit(&e, b"k", 14, 15);
    assert_eq!(
        try_prewrite(&e, &p, Op::CheckNotExists, b"k", b"", false),
        Ok(0)
    );
    must_unlocked(&e, b"k");
    // Async commit: reports min_commit_ts.
    let mut pa = params(b"k", 20);
    pa.use_async_commit = true;
    assert_eq!(
        try_prewrite(&e, &pa, Op::CheckNotExists, b"k", b"", false),
        Ok(21)
    );
    // Another transaction's lock is reported first.
    must_prewrite_put(&e, b"l", b"v", b"l", 16);
    assert!(matches!(
        try_prewrite(&e, &p, Op::CheckNotExists, b"l", b"", false),
        Err(Error::KeyIsLocked(_))
    ));
    // Not in pessimistic transactions.
    let mut pp = params(b"k", 20);
    pp.for_update_ts = 20;
    assert!(matches!(
        try_prewrite(&e, &pp, Op::CheckNotExists, b"k", b"", false),
        Err(Error::Other(_))
    ));
}

#[test]
fn overlapped_rollback_flag() {
    let e = engine();
    // Txn A (start 10) commits k at 30; txn B started at 30 is rolled back on k (protected).
    must_prewrite_put(&e, b"k", b"a", b"k", 10);
    must_commit(&e, b"k", 10, 30);
    must_rollback(&e, b"k", 30, true);
    let w = must_written(&e, b"k", 10, 30, WriteType::Put);
    assert!(w.has_overlapped_rollback);
    assert_eq!(
        reader(&e).get_txn_commit_record(b"k", 30).unwrap(),
        TxnCommitRecord::OverlappedRollback { commit_ts: 30 }
    );
    assert_eq!(must_get(&e, b"k", 30), Some(b"a".to_vec()));
    let st = try_check_txn_status(&e, b"k", 30, 0, 100, true).unwrap();
    assert_eq!(st, TxnStatus::RolledBack);
    // B's late prewrite fails.
    assert!(matches!(
        try_prewrite(&e, &params(b"k", 30), Op::Put, b"k", b"b", false),
        Err(Error::WriteConflict { .. })
    ));
    // An unprotected rollback of an overlapped write changes nothing.
    must_prewrite_put(&e, b"j", b"a", b"j", 10);
    must_commit(&e, b"j", 10, 30);
    must_rollback(&e, b"j", 30, false);
    assert!(!must_written(&e, b"j", 10, 30, WriteType::Put).has_overlapped_rollback);
}

#[test]
fn rollback_carried_by_a_mismatching_lock() {
    let e = engine();
    // Txn A (start 10) holds k; txn B (lock_ts 20) is declared rolled back on k.
    must_prewrite_put(&e, b"k", b"a", b"k", 10);
    let st = try_check_txn_status(&e, b"k", 20, 0, 100, true).unwrap();
    assert_eq!(st, TxnStatus::LockNotExistRollback);
    assert_eq!(must_locked(&e, b"k", 10).rollback_ts, vec![20]);
    must_rolled_back(&e, b"k", 20, true);
    // A commits exactly at 20, overwriting B's rollback record: the flag keeps it.
    must_commit(&e, b"k", 10, 20);
    assert!(must_written(&e, b"k", 10, 20, WriteType::Put).has_overlapped_rollback);
    let st = try_check_txn_status(&e, b"k", 20, 0, 100, true).unwrap();
    assert_eq!(st, TxnStatus::RolledBack);
    assert_eq!(must_get(&e, b"k", 20), Some(b"a".to_vec()));
}

#[test]
fn rollback_ts_survives_pessimistic_conversion() {
    let e = engine();
    must_acquire_pessimistic_lock(&e, b"k", b"k", 10, 10);
    try_check_txn_status(&e, b"k", 20, 0, 100, true).unwrap();
    assert_eq!(must_locked(&e, b"k", 10).rollback_ts, vec![20]);
    let mut p = params(b"k", 10);
    p.for_update_ts = 10;
    try_prewrite(&e, &p, Op::Put, b"k", b"v", true).unwrap();
    assert_eq!(must_locked(&e, b"k", 10).rollback_ts, vec![20]);
}

#[test]
fn mvcc_txn_must_match_start_ts() {
    let e = engine();
    let r = reader(&e);
    let mut txn = MvccTxn::new(5);
    assert!(matches!(
        prewrite(&mut txn, &r, &params(b"k", 6), (Op::Put, b"k", b"v"), false),
        Err(Error::Other(_))
    ));
    let mismatches = [
        check_txn_status(&mut txn, &r, b"k", 6, 0, 0, true).map(|_| ()),
        check_secondary_locks(&mut txn, &r, &[b"k".to_vec()], 6).map(|_| ()),
        resolve_lock(&mut txn, &r, b"k", 6, 0),
        txn_heart_beat(&mut txn, &r, b"k", 6, 1).map(|_| ()),
        acquire_pessimistic_lock(&mut txn, &r, b"k", b"k", 6, 6, 1, false).map(|_| ()),
        pessimistic_rollback(&mut txn, &r, b"k", 6, 6),
    ];
    for m in mismatches {
        assert!(matches!(m, Err(Error::Other(_))), "{m:?}");
    }
    assert!(txn.is_empty());
}

#[test]
fn snapshot_isolation_end_to_end() {
    // Two transactions race on overlapping keys; readers at various timestamps see a
    // consistent snapshot throughout.
    let e = engine();
    for (k, v) in [(&b"x"[..], &b"1"[..]), (b"y", b"1")] {
        must_prewrite_put(&e, k, v, b"x", 1);
    }
    must_commit(&e, b"x", 1, 2);
    must_commit(&e, b"y", 1, 2);

    // T1 (start 10) writes x=2, y=2; T2 (start 11) tries y=3 and must fail.
    must_prewrite_put(&e, b"x", b"2", b"x", 10);
    must_prewrite_put(&e, b"y", b"2", b"x", 10);
    assert!(matches!(
        try_prewrite(&e, &params(b"y", 11), Op::Put, b"y", b"3", false),
        Err(Error::KeyIsLocked(_))
    ));
    // Commit the primary; a reader at 25 meets the secondary's lock, resolves it via the
    // primary's status, and then reads the committed value.
    must_commit(&e, b"x", 10, 20);
    let err = reader(&e).get(b"y", 25, &[]).unwrap_err();
    let Error::KeyIsLocked(info) = err else {
        panic!("{err:?}")
    };
    let st = try_check_txn_status(&e, &info.primary_lock, info.lock_version, 25, 25, true).unwrap();
    assert_eq!(st, TxnStatus::Committed { commit_ts: 20 });
    run(&e, info.lock_version, |txn, r| {
        resolve_lock(txn, r, b"y", info.lock_version, 20)
    })
    .unwrap();
    let snap = reader(&e);
    assert_eq!(snap.get(b"x", 25, &[]).unwrap(), Some(b"2".to_vec()));
    assert_eq!(snap.get(b"y", 25, &[]).unwrap(), Some(b"2".to_vec()));
    assert_eq!(snap.get(b"y", 15, &[]).unwrap(), Some(b"1".to_vec()));
    let all = snap.scan(b"", b"", 0, 19, false, false, &[]).unwrap();
    assert_eq!(
        all,
        vec![
            (b"x".to_vec(), b"1".to_vec()),
            (b"y".to_vec(), b"1".to_vec())
        ]
    );
    // T2 retries after T1's commit with a new start_ts.
    must_prewrite_put(&e, b"y", b"3", b"y", 30);
    must_commit(&e, b"y", 30, 31);
    assert_eq!(must_get(&e, b"y", 31), Some(b"3".to_vec()));
}
