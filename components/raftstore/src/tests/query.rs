//! Reads: ReadIndex rounds, their callbacks, and the leader lease.

use crate::msg::{PeerMsg, RegionSnapshot};
use crate::test_support::{
    must_fail, must_succeed, request, stale_epoch, Answer, TestRegion, TestStore,
};
use crate::Error;
use atoll_engine::memory::MemorySnapshot;
use std::time::Instant;

type ReadAnswer = Answer<crate::Result<RegionSnapshot<MemorySnapshot>>>;

/// A ReadIndex read with `header`, handled in one round.
fn read_with(
    s: &mut TestStore,
    r: &mut TestRegion,
    header: atoll_proto::raft_cmdpb::RaftRequestHeader,
) -> ReadAnswer {
    let header = Box::new(header);
    let (msg, res) = request(|cb| PeerMsg::ReadIndex { header, cb });
    s.round(&mut r.fsm, vec![msg]);
    res
}

fn read(s: &mut TestStore, r: &mut TestRegion) -> ReadAnswer {
    let header = r.fsm.peer.header();
    read_with(s, r, header)
}

#[test]
fn a_read_on_a_single_voter_leader_sees_every_applied_write() {
    let (mut s, mut r) = TestStore::single_leader();
    let written = s.must_write(&mut r, b"k", b"v").index;
    let res = read(&mut s, &mut r);
    s.settle(&mut r);
    let snap = must_succeed(&res);
    assert!(snap.applied_index >= written);
    assert_eq!(snap.term, r.fsm.peer.term());
    assert_eq!(snap.region.id, 1);
}

#[test]
fn a_follower_refuses_reads() {
    let mut s = TestStore::new(1);
    let mut r = s.new_region(1, b"", b"", &[(11, 1), (12, 2), (13, 3)]);
    let res = read(&mut s, &mut r);
    assert!(matches!(must_fail(&res), Error::NotLeader { .. }));
}

#[test]
fn a_read_with_a_stale_epoch_is_refused() {
    let (mut s, mut r) = TestStore::single_leader();
    let mut header = r.fsm.peer.header();
    header.region_epoch = Some(stale_epoch());
    let res = read_with(&mut s, &mut r, header);
    assert!(matches!(must_fail(&res), Error::EpochNotMatch { .. }));
}

/// With three voters a read waits until a quorum answered the heartbeat that carries it.
#[test]
fn a_read_waits_for_a_quorum_to_confirm_the_leader() {
    let (mut s, mut r) = TestStore::three_voters_led_here(|_| {});
    let res = read(&mut s, &mut r);
    s.settle(&mut r);
    assert!(res.lock().is_none(), "answered without confirmation");
    assert!(
        s.reply_as(&mut r, &[12]) > 0,
        "a heartbeat carried the read"
    );
    s.settle(&mut r);
    must_succeed(&res);
}

#[test]
fn pending_reads_of_a_destroyed_peer_fail_with_region_not_found() {
    let (mut s, mut r) = TestStore::three_voters_led_here(|_| {});
    let res = read(&mut s, &mut r);
    s.round(&mut r.fsm, vec![PeerMsg::Destroy]);
    assert!(matches!(must_fail(&res), Error::RegionNotFound(1)));
}

/// A write committed in the leader's term renews its lease (published in the read delegate);
/// a leader transfer ends it for the rest of the term.
#[test]
fn a_committed_write_renews_the_lease_and_a_transfer_ends_it() {
    let (mut s, mut r) = TestStore::single_leader();
    s.must_write(&mut r, b"k", b"v");
    let lease = s.ctx.meta.lock().readers[&1].lease.clone();
    assert!(lease.is_valid_at(Instant::now()));
    assert!(s.ctx.meta.lock().readers[&1].leader_ready);
    r.fsm.peer.forbid_lease();
    assert!(!lease.is_valid_at(Instant::now()));
    s.must_write(&mut r, b"k", b"w");
    assert!(
        !lease.is_valid_at(Instant::now()),
        "no lease for the rest of a term with a transfer"
    );
}
