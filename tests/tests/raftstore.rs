//! The batched Multi-Raft store on an in-process cluster (issue: foundation).
//! Raw data below the transaction layer; see atoll-test-cluster.

use atoll_raftstore::RegionId;
use atoll_test_cluster::{wait_until, Cluster, IsolateStore};
use std::collections::HashSet;
use std::time::{Duration, Instant};

fn key(i: usize) -> Vec<u8> {
    format!("k{i:06}").into_bytes()
}

#[test]
fn writes_replicate_to_every_peer() {
    let mut c = Cluster::new(3);
    c.run();
    for i in 0..50 {
        c.must_put(&key(i), b"v");
    }
    for i in 0..50 {
        c.must_replicated(&key(i), b"v", Duration::from_secs(10));
    }
    c.must_delete(&key(0));
    assert_eq!(c.must_get(&key(0)), None);
}

#[test]
fn leader_crash_loses_no_acknowledged_write() {
    let mut c = Cluster::new(3);
    c.run();
    for i in 0..100 {
        c.must_put(&key(i), format!("v{i}").as_bytes());
    }
    let leader = c.wait_leader(1, Duration::from_secs(10)).unwrap();
    c.stop_store(leader);
    let start = Instant::now();
    let new_leader = c
        .wait_leader(1, Duration::from_secs(10))
        .expect("a new leader");
    assert_ne!(new_leader, leader);
    eprintln!("new leader after {:?}", start.elapsed());
    for i in 0..100 {
        c.must_get_equal(&key(i), format!("v{i}").as_bytes());
    }
    for i in 100..150 {
        c.must_put(&key(i), b"after");
    }
    c.start_store(leader);
    for i in 0..150 {
        let want = if i < 100 {
            format!("v{i}").into_bytes()
        } else {
            b"after".to_vec()
        };
        assert!(
            wait_until(Duration::from_secs(20), || c
                .get_on_store(leader, &key(i))
                .as_deref()
                == Some(&want[..])),
            "restarted store missing key {i}"
        );
    }
}

#[test]
fn partitioned_minority_serves_nothing() {
    let mut c = Cluster::new(3);
    c.run();
    c.must_put(b"a", b"1");
    let old = c.wait_leader(1, Duration::from_secs(10)).unwrap();
    let region = c.get_region(b"a");
    let fid = c.net.add_filter(IsolateStore(old));
    // The old leader alone: a write proposed there must not be acknowledged...
    let router = c.router(old).clone();
    let put = atoll_proto::raft_cmdpb::RaftCmdRequest {
        header: Some(atoll_proto::raft_cmdpb::RaftRequestHeader {
            region_id: 1,
            peer: None,
            region_epoch: region.region_epoch,
            keys: vec![],
        }),
        requests: vec![atoll_proto::raft_cmdpb::Request {
            cmd_type: atoll_proto::raft_cmdpb::CmdType::Put as i32,
            put: Some(atoll_proto::raft_cmdpb::PutRequest {
                cf: "default".into(),
                key: atoll_keys::data_key(b"a"),
                value: b"minority".to_vec(),
            }),
            ..Default::default()
        }],
        admin_request: None,
    };
    let w = c.runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(3), router.propose_async(put)).await
    });
    assert!(
        !matches!(w, Ok(Ok(_))),
        "a minority acknowledged a write: {w:?}"
    );
    // ...nor a linearizable read.
    let header = atoll_proto::raft_cmdpb::RaftRequestHeader {
        region_id: 1,
        peer: None,
        region_epoch: region.region_epoch,
        keys: vec![],
    };
    let r = c.runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(3), router.read_index_async(header)).await
    });
    assert!(
        !matches!(r, Ok(Ok(_))),
        "a minority served a linearizable read"
    );
    // The majority elects a leader and serves.
    assert!(wait_until(Duration::from_secs(10), || c
        .running_stores()
        .iter()
        .any(|s| *s != old && c.router(*s).is_leader(RegionId(1)))));
    c.must_put(b"a", b"2");
    c.must_get_equal(b"a", b"2");
    c.net.remove_filter(fid);
    // The old leader rejoins and learns the new value.
    assert!(wait_until(Duration::from_secs(20), || c
        .get_on_store(old, b"a")
        .as_deref()
        == Some(b"2")));
}

#[test]
fn compacted_follower_catches_up_by_snapshot() {
    let mut c = Cluster::new(3);
    c.run();
    c.must_put(b"k", b"v");
    let leader = c.wait_leader(1, Duration::from_secs(10)).unwrap();
    let follower = *c.store_ids.iter().find(|s| **s != leader).unwrap();
    let applied_before = c
        .router(follower)
        .metrics()
        .snapshots_applied
        .load(std::sync::atomic::Ordering::Relaxed);
    let fid = c.net.add_filter(IsolateStore(follower));
    for i in 0..300 {
        c.must_put(&key(i), b"x");
    }
    // Compact the leader's log past what the follower has.
    c.must_compact_log(1, u64::MAX);
    let leader_engine = c.engine(leader).clone();
    assert!(wait_until(Duration::from_secs(10), || {
        let s = atoll_raftstore::raft::storage::load_apply_state(&leader_engine, 1)
            .unwrap()
            .unwrap();
        s.truncated_state.unwrap().index > 100
    }));
    c.net.remove_filter(fid);
    for i in 0..300 {
        assert!(
            wait_until(Duration::from_secs(30), || c
                .get_on_store(follower, &key(i))
                .as_deref()
                == Some(b"x")),
            "key {i}"
        );
    }
    // The snapshot's data is in the engine (read above) before its apply state is written and
    // the raft side counts it: wait for the count rather than race it.
    let router = c.router(follower);
    let applied = || {
        router
            .metrics()
            .snapshots_applied
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert!(
        wait_until(Duration::from_secs(10), || applied() > applied_before),
        "the follower did not catch up by snapshot"
    );
    // And it keeps following from the log afterwards.
    c.must_put(b"after-snap", b"y");
    c.must_replicated(b"after-snap", b"y", Duration::from_secs(10));
}

#[test]
fn split_into_two_and_into_a_hundred() {
    let mut c = Cluster::new(3);
    c.run();
    c.must_put(b"a", b"1");
    c.must_put(b"z", b"2");
    let regions = c.must_split(&[b"m"]);
    assert_eq!(regions.len(), 2);
    let left = c.get_region(b"a");
    let right = c.get_region(b"z");
    assert_ne!(left.id, right.id);
    assert_eq!(left.end_key, b"m");
    assert_eq!(right.start_key, b"m");
    c.must_get_equal(b"a", b"1");
    c.must_get_equal(b"z", b"2");
    // Into 100: 98 more split points in the right half, at once.
    let points: Vec<Vec<u8>> = (1..=98).map(|i| format!("m{i:03}").into_bytes()).collect();
    let refs: Vec<&[u8]> = points.iter().map(|p| p.as_slice()).collect();
    let made = c.must_split(&refs);
    assert_eq!(made.len(), 99);
    assert!(
        wait_until(Duration::from_secs(30), || c.regions_with_leaders() >= 100),
        "not every region elected a leader"
    );
    let mut seen = HashSet::new();
    for (i, p) in points.iter().enumerate() {
        let mut k = p.clone();
        k.push(b'x');
        c.must_put(&k, format!("{i}").as_bytes());
        let r = c.get_region(&k);
        assert!(atoll_keys::in_range(&k, &r.start_key, &r.end_key));
        seen.insert(r.id);
    }
    assert_eq!(seen.len(), 98, "every key lands in its own region");
    for (i, p) in points.iter().enumerate() {
        let mut k = p.clone();
        k.push(b'x');
        c.must_get_equal(&k, format!("{i}").as_bytes());
    }
    c.must_get_equal(b"a", b"1");
    c.must_get_equal(b"z", b"2");
}

#[test]
fn add_and_remove_peers() {
    let mut c = Cluster::new(4);
    // The first region starts on stores 1-3; store 4 is empty.
    c.run_with_peers(3);
    for i in 0..20 {
        c.must_put(&key(i), b"v");
    }
    let p4 = c.must_add_peer(1, 4);
    assert_eq!(p4.store_id, 4);
    for i in 0..20 {
        assert!(wait_until(Duration::from_secs(20), || c
            .get_on_store(4, &key(i))
            .as_deref()
            == Some(b"v")));
    }
    let region = c.region_by_id(1).unwrap();
    assert_eq!(region.peers.len(), 4);
    // Remove a non-leader peer.
    let leader = c.wait_leader(1, Duration::from_secs(10)).unwrap();
    let victim = *region
        .peers
        .iter()
        .find(|p| p.store_id != leader && p.store_id != 4)
        .unwrap();
    c.must_remove_peer(1, victim);
    assert!(
        wait_until(Duration::from_secs(20), || c
            .router(victim.store_id)
            .region(RegionId(1))
            .is_none()),
        "removed peer not destroyed"
    );
    assert!(
        wait_until(Duration::from_secs(20), || c
            .get_on_store(victim.store_id, &key(0))
            .is_none()),
        "removed peer's data not cleaned"
    );
    c.must_put(b"after", b"remove");
    c.must_get_equal(b"after", b"remove");
    assert_eq!(c.region_by_id(1).unwrap().peers.len(), 3);
}

#[test]
fn restart_every_store_keeps_acknowledged_writes() {
    let mut c = Cluster::new(3);
    c.run();
    c.must_split(&[b"k000500"]);
    for i in 0..1000 {
        c.must_put(&key(i), format!("v{i}").as_bytes());
    }
    for id in c.store_ids.clone() {
        c.stop_store(id);
    }
    for id in c.store_ids.clone() {
        c.start_store(id);
    }
    for i in 0..1000 {
        c.must_get_equal(&key(i), format!("v{i}").as_bytes());
    }
}

#[test]
fn leader_transfer() {
    let mut c = Cluster::new(3);
    c.run();
    c.must_put(b"x", b"1");
    for target in c.store_ids.clone() {
        c.must_transfer_leader(1, target);
        c.must_put(b"x", format!("{target}").as_bytes());
        c.must_get_equal(b"x", format!("{target}").as_bytes());
    }
}

#[test]
fn idle_regions_hibernate_and_wake() {
    let mut c = Cluster::new(3);
    c.run();
    c.must_split(&[b"b", b"c"]);
    c.must_put(b"a", b"1");
    assert!(
        wait_until(Duration::from_secs(20), || c
            .store_ids
            .iter()
            .all(|s| c.router(*s).awake_count() == 0)),
        "regions still awake: {:?}",
        c.store_ids
            .iter()
            .map(|s| c.router(*s).awake_count())
            .collect::<Vec<_>>()
    );
    c.must_put(b"a", b"2");
    c.must_get_equal(b"a", b"2");
    c.must_get_equal(b"a", b"2");
}

/// A member that missed a peer's removal keeps addressing it; the removed store must not bring
/// the peer back from such a stale message (a zombie voter of the old membership), while a
/// peer placed there again later (newer membership, larger id) is welcome.
#[test]
fn removed_peer_is_not_revived_by_stale_messages() {
    use protobuf::Message as _;
    let mut c = Cluster::new(3);
    c.run();
    c.must_put(b"k", b"v");
    let leader = c.wait_leader(1, Duration::from_secs(10)).unwrap();
    let old = c.region_by_id(1).unwrap();
    let victim = *old.peers.iter().find(|p| p.store_id != leader).unwrap();
    let from = *old.peers.iter().find(|p| p.store_id == leader).unwrap();
    c.must_remove_peer(1, victim);
    let router = c.router(victim.store_id).clone();
    assert!(
        wait_until(Duration::from_secs(20), || router.region_count() == 0),
        "removed peer not destroyed"
    );
    // A heartbeat from the old membership, to the removed peer.
    let stale = |to: atoll_proto::metapb::Peer, epoch| {
        let mut m = raft::eraftpb::Message::default();
        m.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
        m.to = to.id;
        m.from = from.id;
        m.term = 100;
        atoll_proto::raft_serverpb::RaftMessage {
            region_id: 1,
            from_peer: Some(from),
            to_peer: Some(to),
            region_epoch: Some(epoch),
            start_key: old.start_key.clone(),
            end_key: old.end_key.clone(),
            message: m.write_to_bytes().unwrap(),
            ..Default::default()
        }
    };
    // Its answers go nowhere (so that nobody tells a revived peer it is gone).
    let fid = c.net.add_filter(IsolateStore(victim.store_id));
    router.send_raft_message(stale(victim, old.region_epoch.unwrap()));
    let revived = wait_until(Duration::from_secs(1), || router.region_count() > 0);
    assert!(!revived, "a stale message brought the removed peer back");
    c.net.remove_filter(fid);
    // A new peer there (newer membership) is created.
    let added = c.must_add_peer(1, victim.store_id);
    assert!(added.id > victim.id);
    assert!(wait_until(Duration::from_secs(20), || c
        .get_on_store(victim.store_id, b"k")
        .as_deref()
        == Some(b"v")));
}

// ---------------- leader leases ----------------

/// Ticks of 50 ms, elections after 1 s: a lease of 800 ms (the largest the rule allows is
/// under (20 - 2) * 50 ms) leaves these tests room on a loaded machine.
fn lease_config() -> atoll_raftstore::Config {
    atoll_raftstore::Config {
        raft_base_tick_interval: atoll_util::config::ReadableDuration::millis(50),
        raft_election_timeout_ticks: 20,
        raft_max_leader_lease: Some(atoll_util::config::ReadableDuration::millis(800)),
        hibernate_regions: false,
        ..atoll_test_cluster::test_config()
    }
}

const LEASE: Duration = Duration::from_millis(800);

/// A 3-store cluster with `k` = `1` written: the cluster, the leader's store, the region.
fn lease_cluster() -> (Cluster, u64, atoll_proto::metapb::Region) {
    let mut c = Cluster::with_config(3, lease_config());
    c.run();
    c.must_put(b"k", b"1");
    let leader = c.wait_leader(1, Duration::from_secs(10)).unwrap();
    let region = c.get_region(b"k");
    (c, leader, region)
}

/// The old leader's lease read must have stopped.
fn assert_no_lease_read(c: &Cluster, store: u64, region: &atoll_proto::metapb::Region, why: &str) {
    assert_eq!(c.lease_read_on(store, region, b"k"), None, "{why}");
}

/// Renews the leader's lease with a ReadIndex round; returns when the round started.
fn renew_lease(c: &Cluster, store: u64) -> Instant {
    let region = c.get_region(b"k");
    let at = Instant::now();
    let router = c.router(store).clone();
    let header = c.header(&region);
    c.runtime
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(5), router.read_index_async(header)).await
        })
        .expect("read index in time")
        .expect("read index");
    at
}

#[test]
fn lease_reads_need_no_messages_and_end_before_a_new_leader_is_elected() {
    let (c, old, region) = lease_cluster();
    let renewed = renew_lease(&c, old);
    c.net.add_filter(IsolateStore(old));
    // Cut off, the leader still answers from its lease: no message round is needed.
    assert_eq!(
        c.lease_read_on(old, &region, b"k"),
        Some(Some(b"1".to_vec()))
    );
    let before = c
        .router(old)
        .metrics()
        .lease_reads
        .load(std::sync::atomic::Ordering::Relaxed);
    let router = c.router(old).clone();
    let header = c.header(&region);
    c.runtime
        .block_on(router.read_async(header))
        .expect("a read within the lease");
    assert_eq!(
        c.router(old)
            .metrics()
            .lease_reads
            .load(std::sync::atomic::Ordering::Relaxed),
        before + 1
    );
    // The others elect a leader, but not before the lease is over.
    let mut new = None;
    assert!(wait_until(Duration::from_secs(15), || {
        new = c
            .running_stores()
            .into_iter()
            .find(|s| *s != old && c.router(*s).is_leader(RegionId(1)));
        new.is_some()
    }));
    let elected = renewed.elapsed();
    assert!(
        elected >= LEASE,
        "a new leader {elected:?} after the old one's lease was renewed (lease {LEASE:?})"
    );
    let new = new.unwrap();
    c.put_on(new, &region, b"k", b"2", Duration::from_secs(5))
        .expect("the new leader writes");
    assert_no_lease_read(&c, old, &region, "stale lease read");
}

#[test]
fn leader_transfer_ends_the_lease() {
    let (c, old, region) = lease_cluster();
    let stores: Vec<u64> = c.store_ids.iter().copied().filter(|s| *s != old).collect();
    let target = stores[0];
    renew_lease(&c, old);
    assert_eq!(
        c.lease_read_on(old, &region, b"k"),
        Some(Some(b"1".to_vec()))
    );
    // The old leader hears nothing more: it cannot learn that it was replaced.
    for s in &stores {
        c.net
            .add_filter(atoll_test_cluster::DropPath { from: *s, to: old });
    }
    let peer = *region.peers.iter().find(|p| p.store_id == target).unwrap();
    let cmd = c.transfer_leader_cmd(&region, peer);
    let router = c.router(old).clone();
    c.runtime
        .block_on(router.propose_async(cmd))
        .expect("transfer proposed");
    // A transfer's candidate is elected with votes that ignore leases, at once.
    assert!(wait_until(Duration::from_secs(5), || c
        .router(target)
        .is_leader(RegionId(1))));
    c.put_on(target, &region, b"k", b"2", Duration::from_secs(5))
        .expect("the new leader writes");
    assert_no_lease_read(
        &c,
        old,
        &region,
        "the old leader served a read from its lease after handing leadership over",
    );
}

#[test]
fn restarted_store_holds_its_vote_while_a_lease_may_run() {
    let (mut c, leader, region) = lease_cluster();
    let others: Vec<u64> = c
        .store_ids
        .iter()
        .copied()
        .filter(|s| *s != leader)
        .collect();
    let (voter, candidate) = (others[0], others[1]);
    // The candidate cannot hear the leader; the voter does, and so refuses to vote...
    c.net.add_filter(atoll_test_cluster::Partition(vec![
        HashSet::from([leader, voter]),
        HashSet::from([voter, candidate]),
    ]));
    let renewed = renew_lease(&c, leader);
    // ...until it restarts and forgets that it heard from the leader, whose lease still runs.
    c.net.clear_filters();
    c.net.add_filter(IsolateStore(leader));
    c.restart_store(voter);
    let restarted = Instant::now();
    c.router(candidate)
        .send_casual(RegionId(1), atoll_raftstore::msg::CasualMessage::Campaign);
    let mut acked = None;
    while renewed.elapsed() < LEASE {
        if c.router(candidate).is_leader(RegionId(1))
            && c.put_on(candidate, &region, b"k", b"2", Duration::from_millis(100))
                .is_ok()
        {
            acked = Some(renewed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if let Some(at) = acked {
        assert_ne!(
            c.lease_read_on(leader, &region, b"k"),
            Some(Some(b"1".to_vec())),
            "a new leader acknowledged a write {at:?} after the old leader's lease was renewed, \
             and the old leader still served the old value from its lease"
        );
    }
    assert!(
        acked.is_none(),
        "a new leader was elected within the old leader's lease ({acked:?}; voter restarted \
         {:?} after the renewal)",
        restarted - renewed
    );
    // Once the hold is over the majority elects a leader, and the old one's lease is long gone.
    assert!(wait_until(Duration::from_secs(15), || c
        .running_stores()
        .into_iter()
        .any(|s| s != leader && c.router(s).is_leader(RegionId(1)))));
    c.must_put(b"k", b"3");
    assert_no_lease_read(&c, leader, &region, "lease outlived a new leader");
}
