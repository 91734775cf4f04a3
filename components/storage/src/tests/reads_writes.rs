//! `read.rs` and `write.rs`: plain reads at a timestamp, one-phase plain writes, scans,
//! delete-range, compare-and-swap and splits.

use super::*;
use atoll_util::config::ReadableSize;

fn scan_req(start: &[u8], end: &[u8], limit: u32) -> ScanRequest {
    ScanRequest {
        start_key: start.to_vec(),
        end_key: end.to_vec(),
        limit,
        ..Default::default()
    }
}

fn keys(ks: &[&[u8]]) -> Vec<Vec<u8>> {
    ks.iter().map(|k| k.to_vec()).collect()
}

#[test]
fn reads_see_the_version_committed_at_or_below_their_timestamp() {
    let c = Cluster::one();
    let c1 = c.must_put(b"k", b"v1");
    let c2 = c.must_put(b"k", b"v2");
    assert!(c2 > c1);
    assert_eq!(c.must_get(b"k", c1 - 1), None);
    assert_eq!(c.must_get(b"k", c1), Some(b"v1".to_vec()));
    assert_eq!(c.must_get(b"k", c2 - 1), Some(b"v1".to_vec()));
    assert_eq!(c.must_get(b"k", c2), Some(b"v2".to_vec()));
    assert_eq!(c.must_get(b"k", 0), Some(b"v2".to_vec()));
    assert!(c.get(b"other", 0).not_found);
}

#[test]
fn a_read_at_a_timestamp_makes_later_writes_commit_above_it() {
    let c = Cluster::one();
    c.must_put(b"k", b"v1");
    // A read at a timestamp PD has not handed out yet (a clock ahead of ours).
    let ahead = c.ts() + (1000 << 18);
    assert_eq!(c.must_get(b"k", ahead), Some(b"v1".to_vec()));
    assert!(c.storage(1).max_ts() >= ahead);
    let commit = c.must_put(b"k", b"v2");
    assert!(
        commit > ahead,
        "commit {commit} at or below a read at {ahead}"
    );
    // That read's answer still holds.
    assert_eq!(c.must_get(b"k", ahead), Some(b"v1".to_vec()));
}

#[test]
fn a_retried_put_is_answered_again_not_applied_twice() {
    let c = Cluster::one();
    let start = c.ts();
    let first = c.put(b"k", b"v", start);
    must_ok(&first.region_error, &first.error);
    let again = c.put(b"k", b"v", start);
    must_ok(&again.region_error, &again.error);
    assert_eq!(again.commit_version, first.commit_version);
    let kv = c.must_etcd_kv(b"k").unwrap();
    assert_eq!(
        (kv.version, kv.mod_revision),
        (1, first.commit_version as i64)
    );
}

#[test]
fn invalid_keys_values_and_batches_are_refused_and_change_nothing() {
    let cfg = StorageConfig {
        max_key_size: ReadableSize(8),
        max_value_size: ReadableSize(16),
        max_batch_size: ReadableSize(30),
        ..Default::default()
    };
    let c = Cluster::new(1, cfg);
    let s = c.storage(1);
    let put = |key: &[u8], value: &[u8]| {
        let req = PutRequest {
            context: c.ctx(b"k"),
            key: key.to_vec(),
            value: value.to_vec(),
            start_version: c.ts(),
        };
        c.run(s.kv_put(req))
    };
    for (k, v) in [
        (&b""[..], &b"v"[..]),
        (&b"123456789"[..], &b"v"[..]),
        (&b"k"[..], &[b'x'; 17][..]),
    ] {
        let e = put(k, v).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{k:?}");
    }
    let pair = |k: &[u8], v: &[u8]| KvPair {
        key: k.to_vec(),
        value: v.to_vec(),
    };
    let batch = BatchPutRequest {
        context: c.ctx(b"k"),
        pairs: vec![pair(b"k1", &[b'x'; 16]), pair(b"k2", &[b'y'; 16])],
        start_version: c.ts(),
    };
    must_invalid(c.run(s.kv_batch_put(batch)));
    let get = GetRequest {
        context: c.ctx(b"k"),
        key: vec![],
        version: 0,
    };
    must_invalid(c.run(s.kv_get(get)));
    assert!(c.must_scan_keys(scan_req(b"", b"", 0)).is_empty());
    // At the limits exactly: accepted.
    let ok = put(b"12345678", &[b'x'; 16]).unwrap();
    must_ok(&ok.region_error, &ok.error);
    assert_eq!(c.must_get(b"12345678", 0), Some(vec![b'x'; 16]));
}

#[test]
fn a_plain_write_needs_a_start_version() {
    let c = Cluster::one();
    let resp = c.put(b"k", b"v", 0);
    must_abort(&resp.error, "start_version");
    assert_eq!(resp.commit_version, 0);
    assert_eq!(c.must_get(b"k", 0), None);
}

#[test]
fn a_plain_write_on_a_locked_key_reports_the_lock_and_writes_nothing() {
    let c = Cluster::one();
    let start = c.must_lock_over(b"k", b"old");
    let resp = c.put(b"k", b"plain", c.ts());
    must_locked(&resp.error, start, b"k");
    assert_eq!(resp.commit_version, 0);
    let rb = c.rollback(&[b"k"], start);
    must_ok(&rb.region_error, &rb.error);
    assert_eq!(c.must_get(b"k", 0), Some(b"old".to_vec()));
}

#[test]
fn a_batch_put_commits_every_pair_at_one_timestamp_and_the_last_value_wins() {
    let c = Cluster::one();
    let pairs = [(b"a", b"1"), (b"b", b"2"), (b"a", b"3")]
        .iter()
        .map(|(k, v)| KvPair {
            key: k.to_vec(),
            value: v.to_vec(),
        })
        .collect();
    let req = BatchPutRequest {
        context: c.ctx(b"a"),
        pairs,
        start_version: c.ts(),
    };
    let resp = c.run(c.storage(1).kv_batch_put(req)).unwrap();
    must_ok(&resp.region_error, &resp.error);
    assert_eq!(c.must_get(b"a", 0), Some(b"3".to_vec()));
    assert_eq!(c.must_get(b"b", 0), Some(b"2".to_vec()));
    let kvs = c.must_etcd_range(b"a", b"c");
    let revs: Vec<(i64, i64)> = kvs.iter().map(|kv| (kv.mod_revision, kv.version)).collect();
    let rev = resp.commit_version as i64;
    assert_eq!(revs, vec![(rev, 1), (rev, 1)]);
}

#[test]
fn a_delete_of_nothing_writes_nothing() {
    let c = Cluster::one();
    assert_eq!(c.must_delete(b"k"), 0);
    let put = c.must_put(b"k", b"v");
    let del = c.must_delete(b"k");
    assert!(del > put);
    assert_eq!(c.must_get(b"k", 0), None);
    assert_eq!(c.must_get(b"k", del - 1), Some(b"v".to_vec()));
    assert_eq!(c.must_delete(b"k"), 0);
}

fn cas(
    c: &Cluster,
    expected: Option<&[u8]>,
    value: Option<&[u8]>,
    start: u64,
) -> CompareAndSwapResponse {
    let req = CompareAndSwapRequest {
        context: c.ctx(b"k"),
        key: b"k".to_vec(),
        expected: expected.unwrap_or_default().to_vec(),
        expect_absent: expected.is_none(),
        value: value.unwrap_or_default().to_vec(),
        delete: value.is_none(),
        start_version: start,
    };
    let resp = c.run(c.storage(1).kv_compare_and_swap(req)).unwrap();
    must_ok(&resp.region_error, &resp.error);
    resp
}

#[test]
fn compare_and_swap_writes_only_when_the_compare_holds() {
    let c = Cluster::one();
    let created = cas(&c, None, Some(b"v1"), c.ts());
    assert!(created.succeeded && created.previous_not_found && created.commit_version > 0);
    // Absent expected, but present: fails, reports the value, writes nothing.
    let r = cas(&c, None, Some(b"v2"), c.ts());
    assert!(!r.succeeded && !r.previous_not_found);
    assert_eq!(
        (r.previous_value.as_slice(), r.commit_version),
        (&b"v1"[..], 0)
    );
    let r = cas(&c, Some(b"other"), Some(b"v2"), c.ts());
    assert!(!r.succeeded);
    assert_eq!(c.must_get(b"k", 0), Some(b"v1".to_vec()));
    // Matching: swapped; a retry of it is answered the same, not applied again.
    let start = c.ts();
    let swapped = cas(&c, Some(b"v1"), Some(b"v2"), start);
    assert!(swapped.succeeded && swapped.commit_version > created.commit_version);
    let retry = cas(&c, Some(b"v1"), Some(b"v2"), start);
    assert!(retry.succeeded);
    assert_eq!(retry.commit_version, swapped.commit_version);
    assert_eq!(retry.previous_value, b"v1".to_vec());
    assert_eq!(c.must_etcd_kv(b"k").unwrap().version, 2);
    // A delete on match.
    let deleted = cas(&c, Some(b"v2"), None, c.ts());
    assert!(deleted.succeeded);
    assert_eq!(c.must_get(b"k", 0), None);
}

#[test]
fn delete_range_deletes_live_keys_in_bounded_batches() {
    let c = Cluster::one();
    for k in [b"k1", b"k2", b"k3", b"k4", b"k5"] {
        c.must_put(k, b"v");
    }
    c.must_delete(b"k2");
    let del = |start: &[u8], end: &[u8], limit: u32| {
        let req = DeleteRangeRequest {
            context: c.ctx(b"k1"),
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            limit,
            start_version: c.ts(),
        };
        c.run(c.storage(1).kv_delete_range(req))
    };
    let r = del(b"k1", b"k5", 2).unwrap();
    must_ok(&r.region_error, &r.error);
    assert_eq!((r.deleted, r.more), (2, true));
    assert_eq!(
        c.must_scan_keys(scan_req(b"", b"", 0)),
        keys(&[b"k4", b"k5"])
    );
    let r = del(b"k1", b"k5", 2).unwrap();
    assert_eq!((r.deleted, r.more), (1, false));
    let r = del(b"k1", b"k5", 2).unwrap();
    assert_eq!((r.deleted, r.more), (0, false));
    assert_eq!(c.must_scan_keys(scan_req(b"", b"", 0)), keys(&[b"k5"]));
    must_invalid(del(b"k5", b"k1", 0));
}

#[test]
fn scans_follow_limit_key_only_reverse_and_version() {
    let c = Cluster::one();
    for k in [b"a", b"b", b"c", b"d"] {
        c.must_put(k, k);
    }
    let before_e = c.must_put(b"e", b"e");
    c.must_delete(b"c");
    assert_eq!(
        c.must_scan_keys(scan_req(b"b", b"e", 0)),
        keys(&[b"b", b"d"])
    );
    assert_eq!(
        c.must_scan_keys(scan_req(b"a", b"", 2)),
        keys(&[b"a", b"b"])
    );
    let at = ScanRequest {
        version: before_e - 1,
        ..scan_req(b"a", b"", 0)
    };
    assert_eq!(c.must_scan_keys(at), keys(&[b"a", b"b", b"c", b"d"]));
    let reverse = ScanRequest {
        reverse: true,
        ..scan_req(b"a", b"e", 2)
    };
    assert_eq!(c.must_scan_keys(reverse), keys(&[b"d", b"b"]));
    let key_only = ScanRequest {
        key_only: true,
        ..scan_req(b"a", b"b", 0)
    };
    let resp = c.scan(key_only);
    assert_eq!(resp.pairs.len(), 1);
    assert_eq!(
        (resp.pairs[0].key.as_slice(), resp.pairs[0].value.len()),
        (&b"a"[..], 0)
    );
    let inverted = ScanRequest {
        context: c.ctx(b"e"),
        ..scan_req(b"e", b"a", 0)
    };
    let refused = c.run(c.storage(1).kv_scan(inverted));
    assert_eq!(refused.unwrap_err().code(), tonic::Code::InvalidArgument);
}

#[test]
fn batch_get_returns_the_keys_that_exist_at_its_version() {
    let c = Cluster::one();
    let ca = c.must_put(b"a", b"1");
    let cc = c.must_put(b"c", b"3");
    let get = |version: u64| {
        let req = BatchGetRequest {
            context: c.ctx(b"a"),
            keys: keys(&[b"c", b"b", b"a"]),
            version,
        };
        let resp = c.run(c.storage(1).kv_batch_get(req)).unwrap();
        must_ok(&resp.region_error, &resp.error);
        resp.pairs
            .into_iter()
            .map(|p| (p.key, p.value))
            .collect::<Vec<_>>()
    };
    let both = vec![
        (b"c".to_vec(), b"3".to_vec()),
        (b"a".to_vec(), b"1".to_vec()),
    ];
    assert_eq!(get(0), both);
    assert_eq!(get(cc), both);
    assert_eq!(get(ca), vec![(b"a".to_vec(), b"1".to_vec())]);
    assert_eq!(get(ca - 1), vec![]);
}

#[test]
fn reads_and_scans_stay_in_their_region() {
    let c = Cluster::one();
    c.must_put(b"a", b"1");
    c.must_put(b"n", b"2");
    let old = c.ctx(b"a");
    c.must_split(b"m");
    let left = c.ctx(b"a");
    let right = c.ctx(b"n");
    assert_ne!(
        left.as_ref().unwrap().region_id,
        right.as_ref().unwrap().region_id
    );
    // An open end stops at the region's end; the caller goes on in the next region.
    let to_end = ScanRequest {
        context: left.clone(),
        ..scan_req(b"a", b"", 0)
    };
    assert_eq!(c.must_scan_keys(to_end), keys(&[b"a"]));
    let past = ScanRequest {
        context: left.clone(),
        ..scan_req(b"a", b"z", 0)
    };
    assert_eq!(c.must_scan_keys(past), keys(&[b"a"]));
    let from_right = ScanRequest {
        context: right.clone(),
        ..scan_req(b"a", b"", 0)
    };
    let e = c.scan(from_right).region_error.unwrap();
    assert_eq!(e.key_not_in_region.unwrap().key, b"a".to_vec());
    // A reverse scan may start before the region (it runs from the end down to it)...
    let reverse = ScanRequest {
        context: right,
        reverse: true,
        ..scan_req(b"a", b"", 0)
    };
    assert_eq!(c.must_scan_keys(reverse), keys(&[b"n"]));
    // ...but not end past it.
    let reverse_past = ScanRequest {
        context: left.clone(),
        reverse: true,
        ..scan_req(b"a", b"z", 0)
    };
    let e = c.scan(reverse_past).region_error.unwrap();
    assert_eq!(e.key_not_in_region.unwrap().key, b"z".to_vec());
    let resp = c.get_on(1, left.unwrap(), b"n", 0);
    let knr = resp.region_error.unwrap().key_not_in_region.unwrap();
    assert_eq!((knr.key, knr.end_key), (b"n".to_vec(), b"m".to_vec()));
    // A split with the pre-split epoch is refused.
    let split = SplitRegionRequest {
        context: old,
        split_keys: vec![b"f".to_vec()],
    };
    let resp = c.run(c.storage(1).split_region(split)).unwrap();
    assert!(resp.region_error.unwrap().epoch_not_match.is_some());
    assert!(resp.regions.is_empty());
}

#[test]
fn a_scan_reports_the_first_lock_it_meets_unless_resolved() {
    let c = Cluster::one();
    c.must_put(b"a", b"1");
    let start = c.must_lock_over(b"b", b"old");
    let at = |version: u64, limit: u32| ScanRequest {
        version,
        ..scan_req(b"a", b"", limit)
    };
    let resp = c.scan(at(c.ts(), 0));
    must_locked(&resp.error, start, b"b");
    assert!(resp.pairs.is_empty());
    // A limit that stops before the lock, a read below its start, a reader that resolved it.
    assert_eq!(c.must_scan_keys(at(c.ts(), 1)), keys(&[b"a"]));
    assert_eq!(c.must_scan_keys(at(start - 1, 0)), keys(&[b"a", b"b"]));
    let mut ctx = c.ctx(b"a").unwrap();
    ctx.resolved_locks = vec![start];
    let resolved = ScanRequest {
        context: Some(ctx),
        ..at(c.ts(), 0)
    };
    let resp = c.scan(resolved);
    must_ok(&resp.region_error, &resp.error);
    let values: Vec<Vec<u8>> = resp.pairs.into_iter().map(|p| p.value).collect();
    assert_eq!(values, vec![b"1".to_vec(), b"old".to_vec()]);
}

#[test]
fn writes_routed_to_the_wrong_region_are_key_not_in_region_and_write_nothing() {
    let c = Cluster::one();
    c.must_split(b"m");
    let left = c.ctx(b"a").unwrap();
    let must_elsewhere = |e: Option<atoll_proto::errorpb::Error>| {
        let knr = e.expect("a region error").key_not_in_region;
        assert_eq!(knr.expect("key_not_in_region").key, b"n".to_vec());
    };
    must_elsewhere(c.put_on(1, left.clone(), b"n", b"v").region_error);
    let prewrite = PrewriteRequest {
        context: Some(left.clone()),
        ..prewrite_req(&[(b"n", b"v")], c.ts())
    };
    must_elsewhere(c.call(b"a", |s| s.kv_prewrite(prewrite)).region_error);
    let range = DeleteRangeRequest {
        context: Some(left.clone()),
        start_key: b"n".to_vec(),
        start_version: c.ts(),
        ..Default::default()
    };
    must_elsewhere(c.call(b"a", |s| s.kv_delete_range(range)).region_error);
    let etcd = EtcdTxnRequest {
        context: Some(left),
        txn: Some(etcd_txn(vec![], vec![put_op(b"n", b"v")])),
        start_version: c.ts(),
    };
    must_elsewhere(c.call(b"a", |s| s.etcd_txn(etcd)).region_error);
    assert_eq!(c.must_get(b"n", 0), None);
    assert!(c.must_scan_locks(b"m", u64::MAX).is_empty());
}
