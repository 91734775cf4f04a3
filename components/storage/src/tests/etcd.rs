//! `etcd/mod.rs`: etcd's key metadata as every write path keeps it, read back through etcd's
//! range; etcd txns on one region.

use super::*;
use atoll_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use atoll_proto::etcdserverpb::response_op::Response;

/// (create_revision, mod_revision, version) of `key` now.
fn meta(c: &Cluster, key: &[u8]) -> (i64, i64, i64) {
    let kv = c.must_etcd_kv(key).expect("a live key");
    (kv.create_revision, kv.mod_revision, kv.version)
}

fn range_req(c: &Cluster, start: &[u8], end: &[u8], limit: u64) -> EtcdRangeRequest {
    EtcdRangeRequest {
        context: c.ctx(start),
        start_key: start.to_vec(),
        end_key: end.to_vec(),
        version: c.ts(),
        limit,
        ..Default::default()
    }
}

fn etcd_range(c: &Cluster, req: EtcdRangeRequest) -> EtcdRangeResponse {
    c.run(c.storage(1).etcd_range(req)).unwrap()
}

#[test]
fn etcd_puts_and_deletes_keep_create_mod_revision_and_version() {
    let c = Cluster::one();
    let r1 = c.must_etcd_put(b"k", b"v1");
    assert_eq!(meta(&c, b"k"), (r1, r1, 1));
    let t = c.must_etcd_txn(etcd_txn(vec![], vec![put_op(b"k", b"v2")]));
    let r2 = t.header.unwrap().revision;
    assert!(r2 > r1);
    assert_eq!(meta(&c, b"k"), (r1, r2, 2));
    let Some(Response::ResponsePut(p)) = &t.responses[0].response else {
        panic!("a put answer: {t:?}")
    };
    let prev = p.prev_kv.clone().expect("prev_kv asked for");
    assert_eq!(
        (prev.value, prev.mod_revision, prev.version),
        (b"v1".to_vec(), r1, 1)
    );
    let t = c.must_etcd_txn(etcd_txn(vec![], vec![del_op(b"k", b"")]));
    let Some(Response::ResponseDeleteRange(d)) = &t.responses[0].response else {
        panic!("a delete answer: {t:?}")
    };
    assert_eq!((d.deleted, d.prev_kvs[0].version), (1, 2));
    assert_eq!(c.must_etcd_kv(b"k"), None);
    // Created again: a new life.
    let r3 = c.must_etcd_put(b"k", b"v3");
    assert_eq!(meta(&c, b"k"), (r3, r3, 1));
}

#[test]
fn every_write_path_keeps_etcds_metadata() {
    let c = Cluster::one();
    let created = c.must_put(b"k", b"plain") as i64;
    assert_eq!(meta(&c, b"k"), (created, created, 1));
    let batch = BatchPutRequest {
        context: c.ctx(b"k"),
        pairs: vec![KvPair {
            key: b"k".to_vec(),
            value: b"batch".to_vec(),
        }],
        start_version: c.ts(),
    };
    let b = c
        .run(c.storage(1).kv_batch_put(batch))
        .unwrap()
        .commit_version as i64;
    assert_eq!(meta(&c, b"k"), (created, b, 2));
    let cas = CompareAndSwapRequest {
        context: c.ctx(b"k"),
        key: b"k".to_vec(),
        expected: b"batch".to_vec(),
        value: b"cas".to_vec(),
        start_version: c.ts(),
        ..Default::default()
    };
    let s = c.run(c.storage(1).kv_compare_and_swap(cas)).unwrap();
    assert!(s.succeeded);
    assert_eq!(meta(&c, b"k"), (created, s.commit_version as i64, 3));
    let two_pc = c.must_txn_put(&[(b"k", b"2pc")]) as i64;
    assert_eq!(meta(&c, b"k"), (created, two_pc, 4));
    let mut one_pc = prewrite_req(&[(b"k", b"1pc")], c.ts());
    one_pc.try_one_pc = true;
    let one_pc = c.prewrite(one_pc).one_pc_commit_ts as i64;
    assert_eq!(meta(&c, b"k"), (created, one_pc, 5));
    let e = c.must_etcd_put(b"k", b"etcd");
    assert_eq!(meta(&c, b"k"), (created, e, 6));
    // A locking-only write (Op::Lock) is not a new version.
    let start = c.ts();
    let lock_only = PrewriteRequest {
        mutations: vec![mutation(Op::Lock, b"k", b"")],
        primary_lock: b"k".to_vec(),
        start_version: start,
        lock_ttl: 10_000,
        ..Default::default()
    };
    assert!(c.prewrite(lock_only).errors.is_empty());
    c.must_commit(&[b"k"], start, c.ts());
    assert_eq!(meta(&c, b"k"), (created, e, 6));
    // Deleted by a transaction, then created by a plain write: version 1 again.
    let start = c.ts();
    let del = PrewriteRequest {
        mutations: vec![mutation(Op::Del, b"k", b"")],
        ..prewrite_req(&[(b"k", b"")], start)
    };
    assert!(c.prewrite(del).errors.is_empty());
    c.must_commit(&[b"k"], start, c.ts());
    let again = c.must_put(b"k", b"back") as i64;
    assert_eq!(meta(&c, b"k"), (again, again, 1));
}

#[test]
fn a_failed_compare_writes_nothing_and_answers_at_a_current_revision() {
    let c = Cluster::one();
    let r1 = c.must_etcd_put(b"k", b"v1");
    let txn = atoll_proto::etcdserverpb::TxnRequest {
        compare: vec![cmp(
            b"k",
            CompareTarget::Value,
            CompareResult::Equal,
            TargetUnion::Value(b"nope".to_vec()),
        )],
        success: vec![put_op(b"k", b"v2")],
        failure: vec![range_op(b"k", b"")],
    };
    let t = c.must_etcd_txn(txn);
    assert!(!t.succeeded);
    let rev = t.header.unwrap().revision;
    assert!(rev > r1);
    let Some(Response::ResponseRange(r)) = &t.responses[0].response else {
        panic!("a range answer: {t:?}")
    };
    assert_eq!(
        (r.kvs[0].value.as_slice(), r.kvs[0].mod_revision),
        (&b"v1"[..], r1)
    );
    assert_eq!(meta(&c, b"k"), (r1, r1, 1));
    // The compare holds on the mod revision: the success branch writes.
    let by_rev = cmp(
        b"k",
        CompareTarget::Mod,
        CompareResult::Equal,
        TargetUnion::ModRevision(r1),
    );
    let t = c.must_etcd_txn(etcd_txn(vec![by_rev], vec![put_op(b"k", b"v2")]));
    assert!(t.succeeded);
    assert_eq!(meta(&c, b"k"), (r1, t.header.unwrap().revision, 2));
}

#[test]
fn a_put_with_a_lease_is_refused_as_etcd_does() {
    let c = Cluster::one();
    let mut op = put_op(b"k", b"v");
    if let Some(request_op::Request::RequestPut(p)) = &mut op.request {
        p.lease = 5;
    }
    let resp = c.etcd_txn(etcd_txn(vec![], vec![op]), c.ts());
    must_ok(&resp.region_error, &resp.error);
    let e = resp.etcd_error.expect("an etcd error");
    assert_eq!(e.code, tonic::Code::NotFound as u32);
    assert_eq!(e.message, "etcdserver: requested lease not found");
    assert_eq!(resp.txn, None);
    assert_eq!(c.must_etcd_kv(b"k"), None);
}

#[test]
fn an_invalid_etcd_txn_is_an_invalid_argument() {
    let c = Cluster::one();
    let s = c.storage(1);
    let run = |txn: atoll_proto::etcdserverpb::TxnRequest| {
        let req = EtcdTxnRequest {
            context: c.ctx(b"k"),
            txn: Some(txn),
            start_version: c.ts(),
        };
        c.run(s.etcd_txn(req)).unwrap_err()
    };
    let dup = run(etcd_txn(
        vec![],
        vec![put_op(b"k", b"1"), put_op(b"k", b"2")],
    ));
    assert_eq!(dup.code(), tonic::Code::InvalidArgument);
    assert!(dup.message().contains("duplicate key"), "{dup:?}");
    let big = vec![b'x'; atoll_keys::DEFAULT_MAX_VALUE_SIZE + 1];
    let too_big = run(etcd_txn(vec![], vec![put_op(b"k", &big)]));
    assert_eq!(too_big.code(), tonic::Code::InvalidArgument, "{too_big:?}");
    let none = EtcdTxnRequest {
        context: c.ctx(b"k"),
        txn: None,
        start_version: c.ts(),
    };
    must_invalid(c.run(s.etcd_txn(none)));
    assert_eq!(c.must_etcd_kv(b"k"), None);
}

#[test]
fn etcd_range_limits_counts_and_stays_in_its_region() {
    let c = Cluster::one();
    for k in [b"a", b"b", b"c", b"n"] {
        c.must_etcd_put(k, b"v");
    }
    c.must_split(b"m");
    let limited = etcd_range(&c, range_req(&c, b"a", b"", 2));
    must_ok(&limited.region_error, &limited.error);
    let keys: Vec<Vec<u8>> = limited.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(
        (keys, limited.count),
        (vec![b"a".to_vec(), b"b".to_vec()], 3)
    );
    let count_only = EtcdRangeRequest {
        count_only: true,
        ..range_req(&c, b"a", b"", 0)
    };
    let r = etcd_range(&c, count_only);
    assert_eq!((r.kvs.len(), r.count), (0, 3));
    let keys_only = EtcdRangeRequest {
        keys_only: true,
        ..range_req(&c, b"a", b"c", 0)
    };
    let r = etcd_range(&c, keys_only);
    assert_eq!(r.kvs.len(), 2);
    assert!(r
        .kvs
        .iter()
        .all(|kv| kv.value.is_empty() && kv.version == 1));
    let elsewhere = EtcdRangeRequest {
        context: c.ctx(b"a"),
        ..range_req(&c, b"n", b"", 0)
    };
    let e = etcd_range(&c, elsewhere).region_error.unwrap();
    assert_eq!(e.key_not_in_region.unwrap().key, b"n".to_vec());
    let right = etcd_range(&c, range_req(&c, b"n", b"", 0));
    assert_eq!(right.count, 1);
    let no_version = EtcdRangeRequest {
        version: 0,
        ..range_req(&c, b"a", b"", 0)
    };
    must_invalid(c.run(c.storage(1).etcd_range(no_version)));
}

#[test]
fn etcd_range_reads_at_its_version() {
    let c = Cluster::one();
    let (r1, r2) = (c.must_etcd_put(b"a", b"1"), c.must_etcd_put(b"a", b"2"));
    c.must_etcd_put(b"b", b"1");
    let at = |version: i64| {
        let req = EtcdRangeRequest {
            version: version as u64,
            ..range_req(&c, b"a", b"", 0)
        };
        let r = etcd_range(&c, req);
        must_ok(&r.region_error, &r.error);
        r.kvs
            .into_iter()
            .map(|kv| (kv.key, kv.value, kv.mod_revision))
            .collect::<Vec<_>>()
    };
    assert_eq!(at(r1), vec![(b"a".to_vec(), b"1".to_vec(), r1)]);
    assert_eq!(at(r2), vec![(b"a".to_vec(), b"2".to_vec(), r2)]);
    assert_eq!(at(r1 - 1), vec![]);
}

#[test]
fn a_retried_etcd_txn_is_answered_as_applied_even_if_its_compare_no_longer_holds() {
    let c = Cluster::one();
    // etcd's lock recipe: take the key if nobody created it.
    let txn = atoll_proto::etcdserverpb::TxnRequest {
        compare: vec![cmp(
            b"lock",
            CompareTarget::Create,
            CompareResult::Equal,
            TargetUnion::CreateRevision(0),
        )],
        success: vec![put_op(b"lock", b"me")],
        failure: vec![range_op(b"lock", b"")],
    };
    let start = c.ts();
    let first = c.etcd_txn(txn.clone(), start);
    must_ok(&first.region_error, &first.error);
    let first = first.txn.expect("an answer");
    assert!(first.succeeded);
    // The answer was lost; the client sends the same txn again.
    let retry = c.etcd_txn(txn, start);
    must_ok(&retry.region_error, &retry.error);
    let retry = retry.txn.expect("an answer");
    assert!(
        retry.succeeded,
        "a retry of an applied txn answered {retry:?}"
    );
    assert_eq!(retry.header, first.header);
    let rev = first.header.unwrap().revision;
    assert_eq!(meta(&c, b"lock"), (rev, rev, 1));
}
