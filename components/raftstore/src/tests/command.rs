//! Proposals: refused with the right error, or answered once applied.

use crate::msg::PeerMsg;
use crate::test_support::{
    admin_cmd, must_fail, must_not_append, stale_epoch, TestRegion, TestStore,
};
use crate::Error;
use atoll_engine::{Peekable, CF_DEFAULT};
use atoll_proto::metapb;
use atoll_proto::raft_cmdpb::{
    AdminCmdType, CmdType, DeleteRangeRequest, RaftCmdRequest, Request, TransferLeaderRequest,
};

#[test]
fn a_proposal_is_answered_with_its_index_and_term_once_applied() {
    let (mut s, mut r) = TestStore::single_leader();
    let cmd = r.put_cmd(b"k", b"v");
    let resp = s.must_answer_cmd(&mut r, cmd).unwrap();
    assert_eq!(resp.index, r.fsm.peer.raft_group.store().last_index());
    assert_eq!(resp.term, r.fsm.peer.term());
    let v = s
        .engine()
        .get_value_cf(CF_DEFAULT, &atoll_keys::data_key(b"k"))
        .unwrap();
    assert_eq!(v.as_deref(), Some(&b"v"[..]));
}

#[test]
fn a_follower_refuses_proposals() {
    let mut s = TestStore::new(1);
    let mut r = s.new_region(1, b"", b"", &[(11, 1), (12, 2), (13, 3)]);
    let cmd = r.put_cmd(b"k", b"v");
    let res = s.propose(&mut r, cmd);
    assert!(matches!(
        must_fail(&res),
        Error::NotLeader {
            region_id: 1,
            leader: None
        }
    ));
}

#[test]
fn a_proposal_with_a_stale_epoch_is_refused() {
    let (mut s, mut r) = TestStore::single_leader();
    let mut cmd = r.put_cmd(b"k", b"v");
    cmd.header.as_mut().unwrap().region_epoch = Some(stale_epoch());
    assert!(matches!(
        s.must_answer_cmd(&mut r, cmd),
        Err(Error::EpochNotMatch { .. })
    ));
}

#[test]
fn a_proposal_for_another_store_is_refused() {
    let (mut s, mut r) = TestStore::single_leader();
    let mut cmd = r.put_cmd(b"k", b"v");
    cmd.header.as_mut().unwrap().peer = Some(metapb::Peer {
        id: 99,
        store_id: 7,
        role: 0,
    });
    assert!(matches!(
        s.must_answer_cmd(&mut r, cmd),
        Err(Error::StoreNotMatch {
            request_store_id: 7,
            actual_store_id: 1
        })
    ));
}

#[test]
fn an_entry_over_the_size_limit_is_refused() {
    let mut s = TestStore::configured(1, |c| {
        c.raft_entry_max_size = atoll_util::config::ReadableSize(64)
    });
    let mut r = s.leader_region(1, b"", b"");
    let last = r.fsm.peer.raft_group.store().last_index();
    let cmd = r.put_cmd(b"k", &[0u8; 100]);
    assert!(matches!(
        s.must_answer_cmd(&mut r, cmd),
        Err(Error::RaftEntryTooLarge { region_id: 1, .. })
    ));
    must_not_append(&r, last);
}

#[test]
fn a_write_outside_the_region_fails_when_applied() {
    let mut s = TestStore::new(1);
    let mut r = s.leader_region(1, b"b", b"d");
    let cmd = r.put_cmd(b"x", b"v");
    assert!(matches!(
        s.must_answer_cmd(&mut r, cmd),
        Err(Error::KeyNotInRegion { .. })
    ));
    assert!(!s.has(CF_DEFAULT, &atoll_keys::data_key(b"x")));
    // The entry is applied all the same (as a refusal): the applied index moves on.
    assert_eq!(
        r.fsm.peer.applied_index,
        r.fsm.peer.raft_group.store().last_index()
    );
}

fn delete_range(r: &TestRegion, start: &[u8], end: &[u8]) -> RaftCmdRequest {
    RaftCmdRequest {
        header: Some(r.fsm.peer.header()),
        requests: vec![Request {
            cmd_type: CmdType::DeleteRange as i32,
            delete_range: Some(DeleteRangeRequest {
                cf: CF_DEFAULT.to_string(),
                start_key: atoll_keys::data_key(start),
                end_key: atoll_keys::data_key(end),
            }),
            ..Default::default()
        }],
        admin_request: None,
    }
}

/// A range may end at the region's end (exclusive) but not past it.
#[test]
fn a_delete_range_may_end_at_the_region_end_but_not_past_it() {
    let mut s = TestStore::new(1);
    let mut r = s.leader_region(1, b"b", b"d");
    s.put(CF_DEFAULT, &atoll_keys::data_key(b"c"), b"v");
    let past = delete_range(&r, b"b", b"e");
    assert!(matches!(
        s.must_answer_cmd(&mut r, past),
        Err(Error::KeyNotInRegion { key, .. }) if key == b"e"
    ));
    assert!(
        s.has(CF_DEFAULT, &atoll_keys::data_key(b"c")),
        "a refused command writes nothing"
    );
    let to_end = delete_range(&r, b"b", b"d");
    s.must_answer_cmd(&mut r, to_end).unwrap();
    assert!(!s.has(CF_DEFAULT, &atoll_keys::data_key(b"c")));
}

#[test]
fn a_leader_transfer_to_a_stranger_is_refused() {
    let (mut s, mut r) = TestStore::single_leader();
    let stranger = metapb::Peer {
        id: 99,
        store_id: 9,
        role: 0,
    };
    let cmd = admin_cmd(&r, AdminCmdType::TransferLeader, |a| {
        a.transfer_leader = Some(TransferLeaderRequest {
            peer: Some(stranger),
        })
    });
    let res = s.propose(&mut r, cmd);
    assert!(matches!(must_fail(&res), Error::InvalidRequest(_)));
    assert!(r.fsm.peer.is_leader());
}

#[test]
fn proposals_of_a_destroyed_peer_fail_with_region_not_found() {
    let (mut s, mut r) = TestStore::three_voters_led_here(|_| {});
    let cmd = r.put_cmd(b"k", b"v");
    // Proposed and sent, never acknowledged: pending when the peer goes.
    let res = s.propose(&mut r, cmd);
    assert!(res.lock().is_none());
    s.round(&mut r.fsm, vec![PeerMsg::Destroy]);
    assert!(matches!(must_fail(&res), Error::RegionNotFound(1)));
}
