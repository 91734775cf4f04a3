//! `gc.rs`: collecting the versions below PD's GC safe point.

use super::*;
use atoll_engine::KvEngine;
use atoll_txn::MvccReader;
use std::sync::atomic::Ordering;

/// The value of `key` at `ts` straight from a store's engine (no safe point check).
fn engine_get(c: &Cluster, store: u64, key: &[u8], ts: u64) -> Option<Vec<u8>> {
    MvccReader::new(c.engine(store).snapshot())
        .get(key, ts, &[])
        .expect("engine read")
}

fn gc_once(c: &Cluster, store: u64, safe_point: u64) -> u64 {
    let (_stop, mut rx) = tokio::sync::watch::channel(false);
    c.run(c.storage(store).gc_once(safe_point, &mut rx))
}

#[test]
fn gc_drops_versions_below_the_safe_point_and_keeps_what_reads_there_see() {
    let c = Cluster::one();
    let k1 = c.must_put(b"k", b"v1");
    let k2 = c.must_put(b"k", b"v2");
    c.must_put(b"k", b"v3");
    let d1 = c.must_put(b"d", b"x");
    c.must_delete(b"d");
    let long = |b: u8| vec![b; atoll_txn::SHORT_VALUE_MAX_LEN + 1];
    let b1 = c.must_put(b"big", &long(1));
    c.must_put(b"big", &long(2));
    let sp = c.ts();
    let k4 = c.must_put(b"k", b"v4");
    // k: two older puts; d: its put and then its delete marker; big: one put and its value.
    assert_eq!(gc_once(&c, 1, sp), 6);
    assert_eq!(engine_get(&c, 1, b"k", k2), None);
    assert_eq!(engine_get(&c, 1, b"k", k1), None);
    assert_eq!(engine_get(&c, 1, b"d", d1), None);
    assert_eq!(engine_get(&c, 1, b"big", b1), None);
    // Reads at the safe point and above are as before.
    assert_eq!(c.must_get(b"k", sp), Some(b"v3".to_vec()));
    assert_eq!(c.must_get(b"k", k4), Some(b"v4".to_vec()));
    assert_eq!(c.must_get(b"big", sp), Some(long(2)));
    assert_eq!(c.must_get(b"d", 0), None);
    assert_eq!(
        c.must_scan_keys(ScanRequest::default()),
        vec![b"big".to_vec(), b"k".to_vec()]
    );
    // Nothing more to collect at the same safe point.
    assert_eq!(gc_once(&c, 1, sp), 0);
}

#[test]
fn gc_in_small_batches_collects_the_same() {
    let c = Cluster::new(
        1,
        StorageConfig {
            gc_batch_keys: 1,
            ..Default::default()
        },
    );
    let mut firsts = vec![];
    for k in [b"a", b"b", b"c"] {
        firsts.push(c.must_put(k, b"old"));
        c.must_put(k, b"new");
    }
    let sp = c.ts();
    assert_eq!(gc_once(&c, 1, sp), 3);
    for (k, first) in [b"a", b"b", b"c"].iter().zip(firsts) {
        assert_eq!(engine_get(&c, 1, *k, first), None);
        assert_eq!(c.must_get(*k, sp), Some(b"new".to_vec()));
    }
}

#[test]
fn only_the_leader_collects_and_followers_follow() {
    let c = Cluster::new(3, StorageConfig::default());
    let leader = c.leader_of(1);
    let follower = *[1, 2, 3].iter().find(|s| **s != leader).unwrap();
    let first = c.must_put(b"k", b"old");
    c.must_put(b"k", b"new");
    let sp = c.ts();
    assert_eq!(gc_once(&c, follower, sp), 0);
    assert_eq!(gc_once(&c, leader, sp), 1);
    // Every peer applies the removal after the writes it collects.
    for store in [1, 2, 3] {
        let collected = wait_until(Duration::from_secs(10), || {
            engine_get(&c, store, b"k", sp) == Some(b"new".to_vec())
                && engine_get(&c, store, b"k", first).is_none()
        });
        assert!(collected, "store {store} kept the collected version");
    }
}

#[test]
fn the_background_pass_follows_pd_and_refuses_reads_below_the_safe_point() {
    let cfg = StorageConfig {
        gc_interval: atoll_util::config::ReadableDuration::millis(20),
        ..Default::default()
    };
    let c = Cluster::new(1, cfg);
    let first = c.must_put(b"k", b"old");
    c.must_put(b"k", b"new");
    let sp = c.ts();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = c.rt.spawn(c.storage(1).clone().run_background(rx));
    c.run(c.pd.update_gc_safe_point(sp)).unwrap();
    let s = c.storage(1);
    assert!(wait_until(Duration::from_secs(10), || {
        s.safe_point.load(Ordering::Relaxed) == sp && engine_get(&c, 1, b"k", first).is_none()
    }));
    must_abort(&c.get(b"k", sp - 1).error, "snapshot too old");
    let below = ScanRequest {
        version: first,
        ..Default::default()
    };
    must_abort(&c.scan(below).error, "below the GC safe point");
    assert_eq!(c.must_get(b"k", sp), Some(b"new".to_vec()));
    assert_eq!(c.must_get(b"k", 0), Some(b"new".to_vec()));
    stop.send(true).unwrap();
    c.run(task).unwrap();
}

#[test]
fn gc_leaves_locks_and_their_transactions_alone() {
    let c = Cluster::one();
    let start = c.must_lock_over(b"k", b"old");
    let sp = c.ts();
    assert_eq!(gc_once(&c, 1, sp), 0);
    let locks = c.must_scan_locks(b"", u64::MAX);
    assert_eq!(locks.len(), 1);
    assert_eq!(locks[0].lock_version, start);
    // The transaction still commits, above the safe point.
    let commit = c.ts();
    c.must_commit(&[b"k"], start, commit);
    assert_eq!(c.must_get(b"k", commit), Some(b"locked".to_vec()));
    assert_eq!(c.must_get(b"k", sp), Some(b"old".to_vec()));
}
