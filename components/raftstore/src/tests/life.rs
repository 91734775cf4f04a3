//! A peer's life: creation for messages, staleness, destroy.

use crate::msg::{PeerMsg, StoreMsg};
use crate::operation::life;
use crate::raft::storage;
use crate::test_support::{TestRegion, TestStore};
use atoll_engine::{KvEngine, CF_DEFAULT, CF_WRITE};
use atoll_proto::metapb;
use atoll_proto::raft_serverpb::{PeerState, RaftMessage};
use protobuf::Message as PbMessage;
use raft::eraftpb::{self, MessageType};

/// The range of a destroyed peer stays claimed until its deletion is written: a snapshot
/// of an overlapping region accepted in between would be wiped by that write. Its data is
/// deleted up to a true bound: keys of long runs of 0xff included.
#[test]
fn destroy_frees_the_range_only_after_its_deletion_is_written() {
    let mut s = TestStore::new(1);
    let mut fsm = s.create_region(10, b"", b"", &[(11, 1), (12, 2), (13, 3)]);
    let long = atoll_keys::append_ts(atoll_keys::data_key(&[0xff; 100]), 5);
    let short = atoll_keys::append_ts(atoll_keys::data_key(b"a"), 5);
    s.put(CF_WRITE, &long, b"w");
    s.put(CF_DEFAULT, &short, b"v");
    s.handle(&mut fsm, vec![PeerMsg::Destroy, PeerMsg::ApplyDestroyed]);
    assert!(s.ctx.meta.lock().regions.contains_key(&10));
    assert_eq!(s.ctx.meta.lock().overlapping(b"m", b"n", 0), vec![10]);
    assert!(
        s.has(CF_DEFAULT, &short),
        "nothing is written before the round ends"
    );
    s.end(&mut fsm);
    assert!(s.ctx.meta.lock().regions.is_empty());
    assert!(s.ctx.meta.lock().overlapping(b"", b"", 0).is_empty());
    assert!(!s.has(CF_DEFAULT, &short));
    assert!(
        !s.has(CF_WRITE, &long),
        "a key of 100 0xff bytes escaped the deletion"
    );
    let st = storage::load_region_state(s.engine(), 10).unwrap().unwrap();
    assert_eq!(st.state, PeerState::Tombstone as i32);
    assert!(storage::load_raft_state(s.engine(), 10).unwrap().is_none());
    assert!(matches!(
        s.receivers.store_rx.try_recv(),
        Ok(StoreMsg::PeerDestroyed { region_id: 10 })
    ));
}

/// A destroyed peer's data is deleted only where no other region here covers it.
#[test]
fn destroy_keeps_data_another_local_region_covers() {
    let mut s = TestStore::new(1);
    let mut fsm = s.create_region(10, b"a", b"m", &[(11, 1)]);
    // A region with an overlapping range registered meanwhile (e.g. by a snapshot).
    let other = metapb::Region {
        id: 20,
        start_key: b"a".to_vec(),
        end_key: b"z".to_vec(),
        ..Default::default()
    };
    s.ctx.meta.lock().set_region(&other);
    let key = atoll_keys::append_ts(atoll_keys::data_key(b"c"), 5);
    s.put(CF_DEFAULT, &key, b"v");
    s.round(&mut fsm, vec![PeerMsg::Destroy, PeerMsg::ApplyDestroyed]);
    assert!(s.has(CF_DEFAULT, &key), "the other region's data stays");
    assert!(storage::load_raft_state(s.engine(), 10).unwrap().is_none());
}

fn heartbeat_msg(region_id: u64, to: (u64, u64), from: (u64, u64), conf_ver: u64) -> RaftMessage {
    let mut m = eraftpb::Message::default();
    m.set_msg_type(MessageType::MsgHeartbeat);
    RaftMessage {
        region_id,
        from_peer: Some(metapb::Peer {
            id: from.0,
            store_id: from.1,
            role: 0,
        }),
        to_peer: Some(metapb::Peer {
            id: to.0,
            store_id: to.1,
            role: 0,
        }),
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver,
            version: 1,
        }),
        start_key: b"".to_vec(),
        end_key: b"".to_vec(),
        message: m.write_to_bytes().unwrap(),
        ..Default::default()
    }
}

/// A tombstone keeps its own (and older) peers from coming back; a peer placed here again
/// with a newer membership is created.
#[test]
fn a_tombstone_blocks_older_peers_but_not_a_newer_one() {
    let s = TestStore::new(1);
    let mut tomb = crate::test_support::region_of(5, b"", b"", &[(51, 1)]);
    tomb.region_epoch.as_mut().unwrap().conf_ver = 2;
    let mut wb = s.engine().write_batch();
    storage::write_region_state(&mut wb, &tomb, PeerState::Tombstone).unwrap();
    s.engine().write(wb, true).unwrap();
    life::maybe_create_peer(&s.ctx, heartbeat_msg(5, (51, 1), (52, 2), 2));
    assert!(
        s.ctx.router.mailbox(5).is_none(),
        "the removed peer came back"
    );
    life::maybe_create_peer(&s.ctx, heartbeat_msg(5, (53, 1), (52, 2), 2));
    assert!(
        s.ctx.router.mailbox(5).is_none(),
        "an old membership revived a peer"
    );
    life::maybe_create_peer(&s.ctx, heartbeat_msg(5, (53, 1), (52, 2), 3));
    assert!(
        s.ctx.router.mailbox(5).is_some(),
        "placed here again: created"
    );
}

/// A message for a range a local region still covers (a split not applied here yet) waits.
#[test]
fn a_message_for_a_covered_range_is_parked_not_created() {
    let s = TestStore::new(1);
    let _r = s.create_region(1, b"", b"", &[(11, 1)]);
    let mut msg = heartbeat_msg(7, (71, 1), (72, 2), 1);
    msg.start_key = b"b".to_vec();
    msg.end_key = b"c".to_vec();
    life::maybe_create_peer(&s.ctx, msg);
    assert!(s.ctx.router.mailbox(7).is_none());
    assert_eq!(s.ctx.meta.lock().take_parked(7).len(), 1);
}

#[test]
fn only_messages_that_may_come_from_a_leader_create_a_peer() {
    let s = TestStore::new(1);
    let mut msg = heartbeat_msg(7, (71, 1), (72, 2), 1);
    let mut m = eraftpb::Message::default();
    m.set_msg_type(MessageType::MsgAppendResponse);
    msg.message = m.write_to_bytes().unwrap();
    life::maybe_create_peer(&s.ctx, msg);
    assert!(s.ctx.router.mailbox(7).is_none());
    life::maybe_create_peer(&s.ctx, heartbeat_msg(7, (71, 1), (72, 2), 1));
    assert!(s.ctx.router.mailbox(7).is_some());
}

fn to_local(r: &TestRegion, to: u64, conf_ver: u64) -> PeerMsg<atoll_engine::memory::MemoryEngine> {
    let mut m = heartbeat_msg(1, (to, 1), (12, 2), conf_ver);
    m.message = vec![];
    m.region_epoch = Some(metapb::RegionEpoch {
        conf_ver,
        version: crate::util::epoch(r.fsm.peer.region()).version,
    });
    PeerMsg::RaftMessage(Box::new(m))
}

/// A newer peer of the region addressed here replaces this one only when the sender knows a
/// newer membership.
#[test]
fn a_newer_peer_replaces_this_one_only_with_a_newer_membership() {
    let mut s = TestStore::new(1);
    let mut r = s.new_region(1, b"", b"", &[(11, 1), (12, 2), (13, 3)]);
    let stale = to_local(&r, 14, 1);
    s.round(&mut r.fsm, vec![stale]);
    assert!(
        !r.fsm.peer.pending_remove,
        "a stale sender cannot remove it"
    );
    let newer = to_local(&r, 14, 2);
    s.round(&mut r.fsm, vec![newer]);
    assert!(r.fsm.peer.pending_remove);
}

#[test]
fn a_tombstone_message_destroys_only_with_a_newer_membership() {
    let mut s = TestStore::new(1);
    let mut r = s.new_region(1, b"", b"", &[(11, 1), (12, 2), (13, 3)]);
    let PeerMsg::RaftMessage(mut old) = to_local(&r, 11, 1) else {
        unreachable!()
    };
    old.is_tombstone = true;
    s.round(&mut r.fsm, vec![PeerMsg::RaftMessage(old.clone())]);
    assert!(!r.fsm.peer.pending_remove);
    old.region_epoch.as_mut().unwrap().conf_ver = 2;
    s.round(&mut r.fsm, vec![PeerMsg::RaftMessage(old)]);
    assert!(r.fsm.peer.pending_remove);
}

/// A sender that was removed and does not know it is told so.
#[test]
fn a_removed_sender_gets_a_tombstone_back() {
    let mut s = TestStore::new(1);
    let mut r = s.new_region(1, b"", b"", &[(11, 1), (12, 2), (13, 3)]);
    let mut m = heartbeat_msg(1, (11, 1), (19, 9), 0);
    m.region_epoch = Some(metapb::RegionEpoch {
        conf_ver: 0,
        version: 1,
    });
    s.round(&mut r.fsm, vec![PeerMsg::RaftMessage(Box::new(m))]);
    let sent = s.trans.take();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].is_tombstone);
    assert_eq!(sent[0].to_peer.unwrap().id, 19);
    assert_eq!(sent[0].region_epoch, r.fsm.peer.region().region_epoch);
}

/// A crash in the middle of a destroy left raft state behind its tombstone: it goes at start.
#[test]
fn a_half_destroyed_peer_is_cleaned_up() {
    let s = TestStore::new(1);
    let fsm = s.create_region(3, b"", b"", &[(31, 1)]);
    let region = fsm.peer.region().clone();
    assert!(storage::load_raft_state(s.engine(), 3).unwrap().is_some());
    life::clean_tombstone(&s.ctx, &region).unwrap();
    assert!(storage::load_raft_state(s.engine(), 3).unwrap().is_none());
    assert!(storage::load_apply_state(s.engine(), 3).unwrap().is_none());
    assert!(
        storage::load_region_state(s.engine(), 3).unwrap().is_some(),
        "the tombstone stays"
    );
}
