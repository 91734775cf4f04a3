//! Raft log GC: what may be compacted, and what compaction removes.

use crate::msg::{CasualMessage, PeerMsg};
use crate::test_support::{admin_cmd, TestRegion, TestStore};
use crate::Error;
use atoll_engine::CF_RAFT;
use atoll_proto::raft_cmdpb::{AdminCmdType, CompactLogRequest, RaftCmdRequest};
use raft::{Storage, StorageError};

fn write(s: &mut TestStore, r: &mut TestRegion, key: &[u8]) {
    let cmd = r.put_cmd(key, b"v");
    s.propose(r, cmd);
}

/// The compaction the leader proposed last (decoded from its newest, unpersisted entry).
fn must_propose_compaction(r: &TestRegion) -> u64 {
    let e = r
        .fsm
        .peer
        .raft_group
        .raft
        .raft_log
        .unstable_entries()
        .last()
        .expect("a proposal")
        .clone();
    let cmd: RaftCmdRequest = prost::Message::decode(e.get_data()).expect("a command");
    let admin = cmd.admin_request.expect("an admin command");
    assert_eq!(admin.cmd_type, AdminCmdType::CompactLog as i32);
    admin.compact_log.unwrap().compact_index
}

/// Entries a follower has not received yet stay: the compaction stops at what every peer
/// has (and what is applied).
#[test]
fn compaction_keeps_what_a_follower_still_needs() {
    let (mut s, mut r) = TestStore::three_voters_led_here(|_| {});
    let all_have = r.fsm.peer.raft_group.store().last_index();
    for k in [b"a", b"b", b"c"] {
        write(&mut s, &mut r, k);
        s.reply_as(&mut r, &[12]);
    }
    s.settle(&mut r);
    assert!(
        r.fsm.peer.applied_index >= all_have + 3,
        "committed by 11 and 12"
    );
    r.fsm.peer.maybe_compact_log(&s.ctx, true);
    assert_eq!(
        must_propose_compaction(&r),
        all_have,
        "13 still needs the rest"
    );
}

#[test]
fn compaction_never_passes_the_applied_index() {
    let (mut s, mut r) = TestStore::single_leader();
    write(&mut s, &mut r, b"a");
    s.settle(&mut r);
    let applied = r.fsm.peer.applied_index;
    // Proposed (and committed) but not applied: out of reach.
    write(&mut s, &mut r, b"b");
    s.take_apply_msgs(1);
    assert!(r.fsm.peer.raft_group.raft.raft_log.committed > applied);
    r.fsm.peer.maybe_compact_log(&s.ctx, true);
    assert_eq!(must_propose_compaction(&r), applied);
}

#[test]
fn a_follower_proposes_no_compaction() {
    let mut s = TestStore::new(1);
    let mut r = s.new_region(1, b"", b"", &[(11, 1), (12, 2), (13, 3)]);
    let last = r.fsm.peer.raft_group.raft.raft_log.last_index();
    r.fsm.peer.maybe_compact_log(&s.ctx, true);
    r.fsm.peer.propose_compact_log(&s.ctx, 5);
    assert_eq!(r.fsm.peer.raft_group.raft.raft_log.last_index(), last);
}

/// An applied compaction moves the truncated state, and the entries below it leave the
/// engine with the next round's write.
#[test]
fn an_applied_compaction_deletes_the_log_below_it() {
    let (mut s, mut r) = TestStore::single_leader();
    for k in [b"a", b"b", b"c"] {
        write(&mut s, &mut r, k);
    }
    s.settle(&mut r);
    let first = r.fsm.peer.raft_group.store().first_index().unwrap();
    let idx = r.fsm.peer.applied_index - 1;
    let msg = PeerMsg::Casual(CasualMessage::CompactLog { index: idx });
    s.round(&mut r.fsm, vec![msg]);
    s.settle(&mut r);
    let store = r.fsm.peer.raft_group.store();
    assert_eq!(store.truncated_index(), idx);
    assert_eq!(store.first_index().unwrap(), idx + 1);
    for i in first..=idx {
        assert!(
            !s.has(CF_RAFT, &atoll_keys::raft_log_key(1, i)),
            "entry {i} left"
        );
    }
    assert!(s.has(CF_RAFT, &atoll_keys::raft_log_key(1, idx + 1)));
    assert!(matches!(
        store.entries(idx, idx + 1, None, raft::GetEntriesContext::empty(false)),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert_eq!(store.term(idx).unwrap(), r.fsm.peer.term());
}

fn compact_cmd(r: &TestRegion, index: u64) -> RaftCmdRequest {
    let compact_log = CompactLogRequest {
        compact_index: index,
        compact_term: 5,
    };
    admin_cmd(r, AdminCmdType::CompactLog, |a| {
        a.compact_log = Some(compact_log)
    })
}

#[test]
fn the_apply_side_refuses_a_compaction_past_applied_and_ignores_an_old_one() {
    let (_s, mut r) = TestStore::single_leader();
    let applied = r.apply.applied_index();
    assert!(matches!(
        {
            let cmd = compact_cmd(&r, applied + 1);
            r.apply.exec_compact_log(&cmd)
        },
        Err(Error::InvalidRequest(_))
    ));
    {
        let cmd = compact_cmd(&r, 5);
        r.apply.exec_compact_log(&cmd)
    }
    .unwrap();
    assert!(
        r.apply.exec_results.is_empty(),
        "nothing to compact at or below the truncated index"
    );
    {
        let cmd = compact_cmd(&r, applied);
        r.apply.exec_compact_log(&cmd)
    }
    .unwrap();
    assert_eq!(r.apply.exec_results.len(), 1);
    assert_eq!(r.apply.apply_state.truncated_state.unwrap().index, applied);
}
