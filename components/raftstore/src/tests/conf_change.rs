//! Conf changes: the type mappings, the leader's checks, and a change applied end to end.

use crate::operation::conf_change::{cmd_type_of_pd, raft_type_of_cmd};
use crate::test_support::{admin_cmd, TestRegion, TestStore};
use crate::Error;
use atoll_proto::metapb::{self, PeerRole};
use atoll_proto::pdpb;
use atoll_proto::raft_cmdpb::{
    AdminCmdType, ChangePeerRequest, ConfChangeType as CmdType, RaftCmdRequest,
};
use atoll_proto::raft_serverpb::PeerState;
use raft::eraftpb::ConfChangeType;

#[test]
fn change_types_map_one_to_one() {
    let pd = [
        (
            pdpb::ConfChangeType::AddNode,
            CmdType::AddNode,
            ConfChangeType::AddNode,
        ),
        (
            pdpb::ConfChangeType::RemoveNode,
            CmdType::RemoveNode,
            ConfChangeType::RemoveNode,
        ),
        (
            pdpb::ConfChangeType::AddLearnerNode,
            CmdType::AddLearnerNode,
            ConfChangeType::AddLearnerNode,
        ),
    ];
    for (p, c, r) in pd {
        assert_eq!(cmd_type_of_pd(p as i32), Some(c));
        assert_eq!(raft_type_of_cmd(c), r);
    }
    assert_eq!(cmd_type_of_pd(99), None);
}

fn change(r: &TestRegion, kind: CmdType, id: u64, store_id: u64) -> RaftCmdRequest {
    let peer = metapb::Peer {
        id,
        store_id,
        role: 0,
    };
    let change_peer = ChangePeerRequest {
        change_type: kind as i32,
        peer: Some(peer),
    };
    admin_cmd(r, AdminCmdType::ChangePeer, |a| {
        a.change_peer = Some(change_peer)
    })
}

#[test]
fn an_added_voter_is_in_the_region_its_epoch_and_raft() {
    let (mut s, mut r) = TestStore::single_leader();
    let cmd = change(&r, CmdType::AddNode, 22, 2);
    let resp = s.must_answer_cmd(&mut r, cmd).unwrap();
    let region = r.fsm.peer.region().clone();
    assert_eq!(resp.regions, vec![region.clone()]);
    let mut peers: Vec<(u64, u64)> = region.peers.iter().map(|p| (p.id, p.store_id)).collect();
    peers.sort();
    assert_eq!(peers, vec![(11, 1), (22, 2)]);
    assert_eq!(crate::util::epoch(&region).conf_ver, 2);
    assert!(
        r.fsm.peer.raft_group.raft.prs().get(22).is_some(),
        "raft knows the voter"
    );
    assert_eq!(s.ctx.meta.lock().regions[&1], region);
    let st = crate::raft::storage::load_region_state(s.engine(), 1)
        .unwrap()
        .unwrap();
    assert_eq!(st.region.unwrap(), region, "written with the apply");
    assert!(r.fsm.peer.peer_cache.contains_key(&22), "addressable");
}

#[test]
fn a_learner_is_added_as_a_learner_then_promoted() {
    let (mut s, mut r) = TestStore::single_leader();
    let cmd = change(&r, CmdType::AddLearnerNode, 22, 2);
    s.must_answer_cmd(&mut r, cmd).unwrap();
    let role = |r: &TestRegion| r.peer(22).role;
    assert_eq!(role(&r), PeerRole::Learner as i32);
    // A learner does not count for the quorum: the single voter still commits alone.
    let cmd = change(&r, CmdType::AddNode, 22, 2);
    s.must_answer_cmd(&mut r, cmd).unwrap();
    assert_eq!(role(&r), PeerRole::Voter as i32);
    assert_eq!(crate::util::epoch(r.fsm.peer.region()).conf_ver, 3);
}

#[test]
fn the_leader_refuses_changes_that_break_the_region() {
    let (mut s, mut r) = TestStore::single_leader();
    let refused = [
        (CmdType::RemoveNode, 11, 1, "the leader removing itself"),
        (CmdType::AddNode, 11, 1, "already a voter"),
        (CmdType::AddNode, 12, 1, "a second peer on one store"),
        (CmdType::RemoveNode, 99, 9, "not a member"),
        (CmdType::AddNode, 0, 2, "no peer id"),
    ];
    for (kind, id, store_id, why) in refused {
        let cmd = change(&r, kind, id, store_id);
        let res = s.must_answer_cmd(&mut r, cmd);
        assert!(matches!(res, Err(Error::InvalidRequest(_))), "{why}");
    }
    assert_eq!(
        crate::util::epoch(r.fsm.peer.region()).conf_ver,
        1,
        "nothing changed"
    );
}

/// This store's follower applies the change that removes it: the region state becomes a
/// tombstone in the apply's write, and the raft side destroys the peer.
#[test]
fn a_peer_that_applies_its_own_removal_is_destroyed() {
    let mut s = TestStore::new(2);
    let mut r = s.new_region(1, b"", b"", &[(11, 1), (12, 2)]);
    let cmd = change(&r, CmdType::RemoveNode, 12, 2);
    let mut cc = raft::eraftpb::ConfChange::default();
    cc.set_change_type(ConfChangeType::RemoveNode);
    cc.node_id = 12;
    cc.context = prost::Message::encode_to_vec(&cmd).into();
    let mut e = raft::eraftpb::Entry {
        index: 6,
        term: 6,
        data: protobuf::Message::write_to_bytes(&cc).unwrap().into(),
        ..Default::default()
    };
    e.set_entry_type(raft::eraftpb::EntryType::EntryConfChange);
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(raft::eraftpb::MessageType::MsgAppend);
    (m.from, m.to, m.term, m.index, m.log_term, m.commit) = (11, 12, 6, 5, 5, 6);
    m.set_entries(vec![e].into());
    let msg = s.raft_msg(&r, r.peer(11), m);
    s.round(&mut r.fsm, vec![msg]);
    s.settle(&mut r);
    assert!(r.fsm.stopped, "destroyed");
    let st = crate::raft::storage::load_region_state(s.engine(), 1)
        .unwrap()
        .unwrap();
    assert_eq!(st.state, PeerState::Tombstone as i32);
    let peers: Vec<u64> = st.region.unwrap().peers.iter().map(|p| p.id).collect();
    assert_eq!(peers, vec![11]);
    assert!(crate::raft::storage::load_raft_state(s.engine(), 1)
        .unwrap()
        .is_none());
    assert!(s.ctx.meta.lock().regions.is_empty());
    assert!(s.ctx.router.mailbox(1).is_none());
}
