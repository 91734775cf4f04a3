//! The Ready cycle: what is persisted before what is sent, and before what is applied.

use crate::fsm::apply::ApplyMsg;
use crate::msg::PeerMsg;
use crate::test_support::{capture, must_succeed, put_cmd, TestStore};
use atoll_engine::{Peekable, CF_RAFT};
use atoll_proto::raft_serverpb::RaftMessage;
use parking_lot::Mutex;
use raft::eraftpb::{self, MessageType};
use std::collections::VecDeque;
use std::sync::Arc;

/// Records, for every message of `kind` sent, whether the engine held raft log entry
/// `index` of region 1 at that moment.
fn probe_log_at_send(s: &TestStore, kind: MessageType, index: u64) -> Arc<Mutex<Vec<bool>>> {
    let seen = Arc::new(Mutex::new(vec![]));
    let (engine, out) = (s.engine().clone(), seen.clone());
    *s.trans.probe.lock() = Some(Box::new(move |m: &RaftMessage| {
        if crate::test_support::decode(m).get_msg_type() == kind {
            let key = atoll_keys::raft_log_key(1, index);
            out.lock()
                .push(engine.get_value_cf(CF_RAFT, &key).unwrap().is_some());
        }
    }));
    seen
}

#[test]
fn a_follower_answers_an_append_only_after_persisting_it() {
    let mut s = TestStore::new(2);
    let mut r = s.new_region(1, b"", b"", &[(11, 1), (12, 2), (13, 3)]);
    let seen = probe_log_at_send(&s, MessageType::MsgAppendResponse, 6);
    let msg = s.leader_append(&r, 6, 5);
    s.handle(&mut r.fsm, vec![msg]);
    assert!(
        !s.trans.has_sent(MessageType::MsgAppendResponse),
        "answered before the round's write"
    );
    s.end(&mut r.fsm);
    assert_eq!(
        *seen.lock(),
        vec![true],
        "one answer, sent with the entry on disk"
    );
    assert_eq!(r.fsm.peer.raft_group.store().last_index(), 6);
}

#[test]
fn a_vote_is_persisted_before_it_is_granted() {
    // No leases: a store that just started would hold its vote for an election timeout.
    let mut s = TestStore::configured(2, |c| {
        c.raft_max_leader_lease = Some(atoll_util::config::ReadableDuration::secs(0))
    });
    let mut r = s.new_region(1, b"", b"", &[(11, 1), (12, 2), (13, 3)]);
    let votes = Arc::new(Mutex::new(vec![]));
    let (engine, out) = (s.engine().clone(), votes.clone());
    *s.trans.probe.lock() = Some(Box::new(move |m: &RaftMessage| {
        if crate::test_support::decode(m).get_msg_type() == MessageType::MsgRequestVoteResponse {
            let st = crate::raft::storage::load_raft_state(&engine, 1)
                .unwrap()
                .unwrap();
            out.lock().push((st.term, st.vote));
        }
    }));
    let mut m = eraftpb::Message::default();
    m.set_msg_type(MessageType::MsgRequestVote);
    m.from = 13;
    m.to = 12;
    m.term = 6;
    m.index = 5;
    m.log_term = 5;
    let msg = s.raft_msg(&r, r.peer(13), m);
    s.handle(&mut r.fsm, vec![msg]);
    assert!(!s.trans.has_sent(MessageType::MsgRequestVoteResponse));
    s.end(&mut r.fsm);
    assert_eq!(
        *votes.lock(),
        vec![(6, 13)],
        "the vote was on disk when granted"
    );
}

#[test]
fn a_leader_sends_appends_before_its_own_write() {
    let (mut s, mut r) = TestStore::three_voters_led_here(|_| {});
    s.trans.take();
    let last = r.fsm.peer.raft_group.store().last_index();
    let cmd = r.put_cmd(b"k", b"v");
    let _res = s.handle_cmd(&mut r, cmd);
    let key = atoll_keys::raft_log_key(1, last + 1);
    assert!(
        s.trans.has_sent(MessageType::MsgAppend),
        "appends go out during the round"
    );
    assert!(
        !s.has(CF_RAFT, &key),
        "the leader's own copy is not written yet"
    );
    s.end(&mut r.fsm);
    assert!(s.has(CF_RAFT, &key));
}

#[test]
fn committed_entries_reach_the_apply_side_only_after_the_write() {
    let (mut s, mut r) = TestStore::single_leader();
    let cmd = r.put_cmd(b"k", b"v");
    let res = s.handle_cmd(&mut r, cmd);
    assert!(
        s.take_apply_msgs(1).is_empty(),
        "nothing applied before the write"
    );
    s.end(&mut r.fsm);
    let msgs = s.take_apply_msgs(1);
    let applied: Vec<u64> = msgs
        .iter()
        .flat_map(|m| match m {
            ApplyMsg::Apply { entries, .. } => entries.iter().map(|e| e.index).collect(),
            _ => vec![],
        })
        .collect();
    let last = r.fsm.peer.raft_group.store().last_index();
    assert_eq!(applied, vec![last]);
    assert!(s.has(CF_RAFT, &atoll_keys::raft_log_key(1, last)));
    assert!(res.lock().is_none(), "answered only once applied");
    s.apply_round(&mut r.apply, msgs);
    assert_eq!(must_succeed(&res).index, last);
}

#[test]
fn one_synced_write_serves_every_region_of_a_round() {
    let mut s = TestStore::new(1);
    let a = s.leader_region(1, b"", b"m");
    let b = s.leader_region(2, b"m", b"");
    let before = s.ctx.metrics.synced_write_batches();
    let mut batch = vec![a.fsm, b.fsm];
    {
        use crate::batch::PollHandler;
        s.poller.begin(2);
        for fsm in batch.iter_mut() {
            let (cb, _) = capture();
            let cmd = PeerMsg::RaftCommand {
                cmd: Box::new(put_cmd(&fsm.peer, b"x", b"1")),
                cb,
            };
            s.poller.handle(fsm, &mut VecDeque::from(vec![cmd]));
        }
        s.poller.end(&mut batch);
    }
    assert_eq!(s.ctx.metrics.synced_write_batches(), before + 1);
    for fsm in &batch {
        let last = fsm.peer.raft_group.store().last_index();
        assert!(s.has(CF_RAFT, &atoll_keys::raft_log_key(fsm.region_id(), last)));
    }
}

#[test]
fn apply_results_move_the_raft_side_applied_index() {
    let (mut s, mut r) = TestStore::single_leader();
    let index = s.must_write(&mut r, b"k", b"v").index;
    assert_eq!(r.fsm.peer.applied_index, index);
    assert_eq!(r.fsm.peer.raft_group.store().applied_index(), index);
    let st = crate::raft::storage::load_apply_state(s.engine(), 1)
        .unwrap()
        .unwrap();
    assert_eq!(
        st.applied_index, index,
        "the applied index is written with the data"
    );
    assert!(s.has(atoll_engine::CF_DEFAULT, &atoll_keys::data_key(b"k")));
}

/// Past `apply-max-pending-size` a peer fetches no more committed entries until apply
/// catches up: they stay in the log, then go over with the next apply result.
#[test]
fn a_lagging_apply_holds_committed_entries_in_the_log() {
    let mut s = TestStore::configured(1, |c| {
        c.apply_max_pending_size = atoll_util::config::ReadableSize(1)
    });
    let mut r = s.leader_region(1, b"", b"");
    let c1 = r.put_cmd(b"a", b"1");
    s.propose(&mut r, c1);
    let first = s.take_apply_msgs(1);
    assert_eq!(first.len(), 1);
    let c2 = r.put_cmd(b"b", b"2");
    s.propose(&mut r, c2);
    assert!(
        s.take_apply_msgs(1).is_empty(),
        "held while the first is pending"
    );
    assert!(r.fsm.peer.apply_held);
    s.apply_round(&mut r.apply, first);
    let res = s.take_peer_msgs(1);
    s.round(&mut r.fsm, res);
    let second = s.take_apply_msgs(1);
    assert_eq!(second.len(), 1, "handed over once apply caught up");
}
