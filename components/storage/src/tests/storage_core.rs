//! `storage.rs`: what every command shares — validation, admission, error conversions, the
//! store/region checks and the timestamp rules of a new leader.

use super::*;
use crate::storage::{abort, fail_into, Fail};
use std::sync::atomic::Ordering;

#[test]
fn fail_conversions_keep_the_error_typed() {
    let leader = metapb::Peer {
        id: 4,
        store_id: 5,
        role: 0,
    };
    let f = Fail::from(atoll_raftstore::Error::NotLeader {
        region_id: 3,
        leader: Some(leader),
    });
    let Fail::Region(e) = f else {
        panic!("a raftstore error is a region error")
    };
    let nl = e.not_leader.expect("not_leader set");
    assert_eq!((nl.region_id, nl.leader), (3, Some(leader)));

    let info = LockInfo {
        key: b"k".to_vec(),
        lock_version: 7,
        primary_lock: b"p".to_vec(),
        ..Default::default()
    };
    let Fail::Key(e) = Fail::from(atoll_txn::Error::KeyIsLocked(info.clone())) else {
        panic!("a txn error is a key error")
    };
    assert_eq!(e.locked, Some(info));

    let Fail::Key(e) = Fail::from(atoll_txn::Error::TxnNotFound {
        start_ts: 9,
        key: b"p".to_vec(),
    }) else {
        panic!("a txn error is a key error")
    };
    let nf = e.txn_not_found.expect("txn_not_found set");
    assert_eq!((nf.start_ts, nf.primary_key), (9, b"p".to_vec()));

    let Fail::Key(e) = Fail::from(atoll_engine::Error::CfNotFound("nope".into())) else {
        panic!("an engine error is a key error")
    };
    assert!(e.abort.starts_with("engine: "), "{e:?}");
    assert!(e.abort.contains("nope"), "{e:?}");
    assert_eq!((e.locked, e.conflict), (None, None));

    let Fail::Key(e) = abort("stop") else {
        panic!("abort is a key error")
    };
    assert_eq!(e.abort, "stop");
}

#[test]
fn failures_fill_the_response_field_of_their_kind() {
    let ke = |m: &str| KeyError {
        abort: m.into(),
        ..Default::default()
    };
    // One error field: the first of several key errors.
    let mut one = GetResponse::default();
    fail_into!(one, Fail::Keys(vec![ke("a"), ke("b")]), key);
    assert_eq!((one.error, one.region_error), (Some(ke("a")), None));
    // A list of errors: all of them.
    let mut all = PrewriteResponse::default();
    fail_into!(all, Fail::Keys(vec![ke("a"), ke("b")]), keys);
    assert_eq!(all.errors, vec![ke("a"), ke("b")]);
    let mut single = PrewriteResponse::default();
    fail_into!(single, abort("c"), keys);
    assert_eq!(single.errors, vec![ke("c")]);
    let mut region = PrewriteResponse::default();
    fail_into!(
        region,
        Fail::from(atoll_raftstore::Error::StaleCommand),
        keys
    );
    assert!(region.region_error.unwrap().stale_command.is_some());
    assert!(region.errors.is_empty());
}

#[test]
fn admission_is_bounded_and_every_permit_is_returned() {
    let two = StorageConfig {
        max_inflight_requests: 2,
        ..Default::default()
    };
    let c = Cluster::new(1, two);
    let s = c.storage(1);
    let p1 = s.admit().expect("first permit");
    let p2 = s.admit().expect("second permit");
    assert!(s.admit().is_none(), "a third request in flight is refused");
    // A refused request leaves no trace.
    assert_eq!(s.inflight.load(Ordering::Relaxed), 2);
    drop(p1);
    let p3 = s.admit().expect("a permit freed by a finished request");
    assert!(s.admit().is_none());
    drop((p2, p3));
    assert_eq!(s.inflight.load(Ordering::Relaxed), 0);
}

#[test]
fn requests_without_context_or_region_are_invalid_arguments() {
    let c = Cluster::one();
    let s = c.storage(1);
    let no_ctx = GetRequest {
        context: None,
        key: b"k".to_vec(),
        version: 0,
    };
    must_invalid(c.run(s.kv_get(no_ctx)));
    let no_region = PutRequest {
        context: Some(Context::default()),
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        start_version: c.ts(),
    };
    must_invalid(c.run(s.kv_put(no_region)));
    assert_eq!(c.must_get(b"k", 0), None);
}

#[test]
fn a_request_for_another_store_is_store_not_match_and_writes_nothing() {
    let c = Cluster::one();
    let mut ctx = c.ctx(b"k").unwrap();
    ctx.peer.as_mut().unwrap().store_id = 7;
    let resp = c.put_on(1, ctx.clone(), b"k", b"v");
    let snm = resp.region_error.unwrap().store_not_match.unwrap();
    assert_eq!((snm.request_store_id, snm.actual_store_id), (7, 1));
    assert_eq!(resp.commit_version, 0);
    let resp = c.get_on(1, ctx, b"k", 0);
    assert!(resp.region_error.unwrap().store_not_match.is_some());
    assert_eq!(c.must_get(b"k", 0), None);
}

#[test]
fn an_unknown_region_is_region_not_found() {
    let c = Cluster::one();
    let mut ctx = c.ctx(b"k").unwrap();
    ctx.region_id = 99;
    let put = c.put_on(1, ctx.clone(), b"k", b"v").region_error;
    let get = c.get_on(1, ctx, b"k", 0).region_error;
    for e in [put, get] {
        assert_eq!(e.unwrap().region_not_found.unwrap().region_id, 99);
    }
}

#[test]
fn a_stale_epoch_is_epoch_not_match_with_the_current_region() {
    let c = Cluster::one();
    let old = c.ctx(b"a");
    let regions = c.must_split(b"m");
    let now = regions
        .iter()
        .find(|r| r.id == 1)
        .expect("region 1 after the split");
    let resp = c.put_on(1, old.clone().unwrap(), b"a", b"v");
    let enm = resp.region_error.unwrap().epoch_not_match.unwrap();
    assert_eq!(enm.current_regions.len(), 1);
    assert_eq!(enm.current_regions[0].id, 1);
    assert_eq!(enm.current_regions[0].region_epoch, now.region_epoch);
    assert_eq!(enm.current_regions[0].region_epoch.unwrap().version, 2);
    let scan = ScanRequest {
        context: old,
        start_key: b"a".to_vec(),
        ..Default::default()
    };
    assert!(c.scan(scan).region_error.unwrap().epoch_not_match.is_some());
    assert_eq!(c.must_get(b"a", 0), None);
}

#[test]
fn a_follower_answers_not_leader_naming_the_leader() {
    let c = Cluster::new(3, StorageConfig::default());
    let leader = c.leader_of(1);
    let follower = *[1, 2, 3].iter().find(|s| **s != leader).unwrap();
    let ctx = ctx_on(&c.region(b"k"), follower);
    let resp = c.put_on(follower, ctx.clone(), b"k", b"v");
    let nl = resp.region_error.unwrap().not_leader.unwrap();
    assert_eq!(nl.region_id, 1);
    // The hint may lag right after the election; when given, it is the leader.
    if let Some(p) = nl.leader {
        assert_eq!(p.store_id, leader);
    }
    let resp = c.get_on(follower, ctx, b"k", c.ts());
    assert!(resp.region_error.unwrap().not_leader.is_some());
    assert_eq!(c.must_get(b"k", 0), None);
    // The leader serves the same request.
    let served = c.put_on(leader, ctx_on(&c.region(b"k"), leader), b"k", b"v");
    must_ok(&served.region_error, &served.error);
    assert_eq!(c.must_get(b"k", 0), Some(b"v".to_vec()));
}

#[test]
fn a_new_leader_commits_above_every_timestamp_pd_handed_out_before() {
    let c = Cluster::one();
    let before = c.ts();
    // A start timestamp far below PD's: without syncing max_ts with PD first, the commit
    // timestamp would be 2.
    let resp = c.put(b"k", b"v", 1);
    must_ok(&resp.region_error, &resp.error);
    assert!(
        resp.commit_version > before,
        "commit {} not above {before}",
        resp.commit_version
    );
    assert_eq!(c.storage(1).synced.lock().len(), 1);
}

#[test]
fn unsafe_local_reads_are_refused_unless_enabled() {
    let refused = Cluster::one();
    refused.must_put(b"k", b"v");
    let mut ctx = refused.ctx(b"k").unwrap();
    ctx.unsafe_local_read = true;
    let resp = refused.get_on(1, ctx.clone(), b"k", 0);
    must_abort(&resp.error, "unsafe_local_read is disabled");
    let cfg = StorageConfig {
        allow_unsafe_local_read: true,
        ..Default::default()
    };
    let allowed = Cluster::new(1, cfg);
    allowed.must_put(b"k", b"v");
    let resp = allowed.get_on(1, ctx, b"k", 0);
    must_ok(&resp.region_error, &resp.error);
    assert_eq!(resp.value, b"v".to_vec());
}

#[test]
fn a_leader_after_a_transfer_commits_above_the_reads_its_predecessor_served() {
    let c = Cluster::new(3, StorageConfig::default());
    let old = c.leader_of(1);
    c.must_put(b"k", b"v1");
    // A read the old leader serves (the others never hear of its timestamp).
    let read_at = c.ts();
    assert_eq!(c.must_get(b"k", read_at), Some(b"v1".to_vec()));
    let new = *[1, 2, 3].iter().find(|s| **s != old).unwrap();
    assert_eq!(c.storage(new).max_ts(), 0);
    c.must_transfer_leader(1, new);
    // A start timestamp far below: only a max_ts synced with PD puts the commit above the read.
    let put = PutRequest {
        context: Some(ctx_on(&c.region(b"k"), new)),
        key: b"k".to_vec(),
        value: b"v2".to_vec(),
        start_version: 1,
    };
    let resp = c.run(c.storage(new).kv_put(put)).unwrap();
    must_ok(&resp.region_error, &resp.error);
    assert!(
        resp.commit_version > read_at,
        "{} <= {read_at}",
        resp.commit_version
    );
    assert_eq!(c.must_get(b"k", read_at), Some(b"v1".to_vec()));
    assert_eq!(c.must_get(b"k", 0), Some(b"v2".to_vec()));
}
