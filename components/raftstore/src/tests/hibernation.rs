//! Hibernation: idle regions stop ticking; anything new wakes them.

use crate::msg::PeerMsg;
use crate::test_support::{TestRegion, TestStore};
use atoll_proto::raft_serverpb::{ExtraMessageType, RaftMessage};
use raft::eraftpb::{self, MessageType};

type Msg = PeerMsg<atoll_engine::memory::MemoryEngine>;

/// Regions may hibernate, after three idle ticks.
fn hibernate_soon(c: &mut crate::Config) {
    c.hibernate_regions = true;
    c.hibernate_after_ticks = 3;
}

fn hibernating_store(store_id: u64) -> TestStore {
    TestStore::configured(store_id, hibernate_soon)
}

fn tick(s: &mut TestStore, r: &mut TestRegion, n: usize) {
    for _ in 0..n {
        s.round(&mut r.fsm, vec![PeerMsg::Tick]);
    }
}

fn awake(s: &TestStore, region_id: u64) -> bool {
    s.ctx.awake.lock().contains(&region_id)
}

#[test]
fn an_idle_leader_hibernates_after_its_idle_ticks_and_stops_ticking() {
    let mut s = hibernating_store(1);
    let mut r = s.leader_region(1, b"", b"");
    assert!(awake(&s, 1));
    tick(&mut s, &mut r, 2);
    assert!(!r.fsm.peer.hibernating, "asleep before its idle ticks");
    tick(&mut s, &mut r, 1);
    assert!(r.fsm.peer.hibernating);
    assert!(!awake(&s, 1), "the ticker no longer ticks it");
    let ticks = r.fsm.peer.ticks;
    tick(&mut s, &mut r, 5);
    assert_eq!(r.fsm.peer.ticks, ticks, "a hibernating peer ignores ticks");
}

#[test]
fn a_proposal_wakes_a_hibernating_leader() {
    let mut s = hibernating_store(1);
    let mut r = s.leader_region(1, b"", b"");
    tick(&mut s, &mut r, 3);
    assert!(r.fsm.peer.hibernating);
    s.must_write(&mut r, b"k", b"v");
    assert!(!r.fsm.peer.hibernating);
    assert!(awake(&s, 1));
}

#[test]
fn a_leader_with_a_follower_behind_stays_awake() {
    let (mut s, mut r) = TestStore::three_voters_led_here(hibernate_soon);
    let cmd = r.put_cmd(b"k", b"v");
    s.propose(&mut r, cmd);
    // Nobody acknowledges the write: it stays uncommitted, the followers behind.
    s.trans.take();
    // Well past its idle ticks, short of an election timeout (a check of its quorum).
    tick(&mut s, &mut r, 8);
    assert!(r.fsm.peer.is_leader());
    assert!(!r.fsm.peer.hibernating);
    assert!(awake(&s, 1));
}

/// A leader that goes to sleep tells each follower, with its term and last index.
#[test]
fn a_hibernating_leader_tells_its_followers() {
    let (mut s, mut r) = TestStore::three_voters_led_here(hibernate_soon);
    for _ in 0..3 {
        s.round(&mut r.fsm, vec![PeerMsg::Tick]);
        if r.fsm.peer.hibernating {
            break;
        }
        s.reply_as(&mut r, &[12, 13]);
    }
    assert!(r.fsm.peer.hibernating);
    let told: Vec<RaftMessage> = s
        .trans
        .take()
        .into_iter()
        .filter(|m| m.extra == ExtraMessageType::Hibernate as i32)
        .collect();
    let mut to: Vec<u64> = told.iter().map(|m| m.to_peer.unwrap().id).collect();
    to.sort();
    assert_eq!(to, vec![12, 13]);
    let last = r.fsm.peer.raft_group.raft.raft_log.last_index();
    assert!(told
        .iter()
        .all(|m| m.term == r.fsm.peer.term() && m.last_index == last));
}

/// The local follower (peer 12) of a region led by peer 11 at term 6, entry 6 committed.
fn follower(s: &mut TestStore) -> TestRegion {
    let mut r = s.new_region(1, b"", b"", &[(11, 1), (12, 2), (13, 3)]);
    let msg = s.leader_append(&r, 6, 6);
    s.round(&mut r.fsm, vec![msg]);
    s.settle(&mut r);
    assert_eq!(r.fsm.peer.leader_id(), 11);
    r
}

fn hibernate_msg(s: &TestStore, r: &TestRegion, last_index: u64) -> Msg {
    let PeerMsg::RaftMessage(mut m) = s.raft_msg(r, r.peer(11), eraftpb::Message::default()) else {
        unreachable!()
    };
    m.message = vec![];
    m.extra = ExtraMessageType::Hibernate as i32;
    m.term = 6;
    m.last_index = last_index;
    PeerMsg::RaftMessage(m)
}

/// The follower goes to sleep as its leader (at its last index) says, and stops ticking.
fn must_sleep(s: &mut TestStore, r: &mut TestRegion) {
    let msg = hibernate_msg(s, r, 6);
    s.round(&mut r.fsm, vec![msg]);
    assert!(r.fsm.peer.hibernating);
    assert!(!awake(s, 1));
}

fn heartbeat(s: &TestStore, r: &TestRegion, commit: u64) -> Msg {
    let mut m = eraftpb::Message::default();
    m.set_msg_type(MessageType::MsgHeartbeat);
    m.from = 11;
    m.to = 12;
    m.term = 6;
    m.commit = commit;
    s.raft_msg(r, r.peer(11), m)
}

#[test]
fn a_follower_sleeps_when_its_leader_says_so_and_wakes_on_news() {
    let mut s = hibernating_store(2);
    let mut r = follower(&mut s);
    // A leader whose log differs from this follower's is not followed to sleep.
    let stale = hibernate_msg(&s, &r, 5);
    s.round(&mut r.fsm, vec![stale]);
    assert!(!r.fsm.peer.hibernating);
    must_sleep(&mut s, &mut r);
    // The leader's last heartbeat carries nothing new: still asleep.
    let hb = heartbeat(&s, &r, 6);
    s.round(&mut r.fsm, vec![hb]);
    assert!(r.fsm.peer.hibernating);
    // A new entry is news.
    let news = s.leader_append(&r, 7, 6);
    s.round(&mut r.fsm, vec![news]);
    assert!(!r.fsm.peer.hibernating);
    assert!(awake(&s, 1));
}

/// A sleeping follower asked for a leader's work wakes its whole group.
#[test]
fn a_sleeping_follower_asked_to_lead_wakes_the_group() {
    let mut s = hibernating_store(2);
    let mut r = follower(&mut s);
    must_sleep(&mut s, &mut r);
    s.trans.take();
    let cmd = r.put_cmd(b"k", b"v");
    s.propose(&mut r, cmd);
    assert!(!r.fsm.peer.hibernating);
    let mut woken: Vec<u64> = s
        .trans
        .take()
        .into_iter()
        .filter(|m| m.extra == ExtraMessageType::WakeUp as i32)
        .map(|m| m.to_peer.unwrap().id)
        .collect();
    woken.sort();
    assert_eq!(woken, vec![11, 13]);
}
