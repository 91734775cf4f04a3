//! Splits: the one split-key rule, and a split applied end to end.

use crate::msg::{CasualMessage, PeerMsg};
use crate::operation::split::{check_split_keys, validate_split_requests};
use crate::test_support::{
    capture, must_answer, must_fail, must_not_append, stale_epoch, TestRegion, TestStore,
};
use crate::Error;
use atoll_proto::raft_cmdpb::{BatchSplitRequest, SplitRequest};
use atoll_proto::raft_serverpb::PeerState;
use atoll_proto::{metapb, pdpb};

fn region(start: &[u8], end: &[u8]) -> metapb::Region {
    metapb::Region {
        id: 1,
        start_key: start.to_vec(),
        end_key: end.to_vec(),
        peers: vec![metapb::Peer {
            id: 11,
            store_id: 1,
            role: 0,
        }],
        ..Default::default()
    }
}

fn keys<'a>(ks: &'a [&'a [u8]]) -> impl Iterator<Item = &'a [u8]> {
    ks.iter().copied()
}

#[test]
fn split_keys_must_be_sorted_distinct_and_inside_the_region() {
    let r = region(b"b", b"m");
    check_split_keys(&r, keys(&[b"c", b"d"])).unwrap();
    let invalid = |e| matches!(e, Err(Error::InvalidRequest(_)));
    assert!(invalid(check_split_keys(&r, keys(&[]))), "no key");
    assert!(
        invalid(check_split_keys(&r, keys(&[b"d", b"c"]))),
        "unsorted"
    );
    assert!(
        invalid(check_split_keys(&r, keys(&[b"c", b"c"]))),
        "repeated"
    );
    assert!(
        invalid(check_split_keys(&r, keys(&[b"b"]))),
        "the region's start"
    );
    assert!(matches!(
        check_split_keys(&r, keys(&[b"m"])),
        Err(Error::KeyNotInRegion { .. })
    ));
    assert!(matches!(
        check_split_keys(&r, keys(&[b"a"])),
        Err(Error::KeyNotInRegion { .. })
    ));
    // An unbounded region takes any key above its start.
    check_split_keys(&region(b"", b""), keys(&[b"\xff\xff"])).unwrap();
}

#[test]
fn a_split_request_needs_one_new_peer_id_per_peer() {
    let r = region(b"", b"");
    let mut req = BatchSplitRequest {
        requests: vec![SplitRequest {
            split_key: b"k".to_vec(),
            new_region_id: 2,
            new_peer_ids: vec![21],
        }],
    };
    validate_split_requests(&r, &req).unwrap();
    req.requests[0].new_peer_ids.push(22);
    assert!(matches!(
        validate_split_requests(&r, &req),
        Err(Error::InvalidRequest(_))
    ));
}

fn ids(new_ids: &[(u64, u64)]) -> Vec<pdpb::SplitId> {
    new_ids
        .iter()
        .map(|(region, peer)| pdpb::SplitId {
            new_region_id: *region,
            new_peer_ids: vec![*peer],
        })
        .collect()
}

/// Proposes a split of `r` at `split_keys` with PD's `new_ids` and runs it to the end.
fn split(
    s: &mut TestStore,
    r: &mut TestRegion,
    split_keys: &[&[u8]],
    new_ids: &[(u64, u64)],
) -> crate::Result<crate::WriteResponse> {
    let (cb, res) = capture();
    let msg = PeerMsg::Casual(CasualMessage::ProposeSplit {
        epoch: crate::util::epoch(r.fsm.peer.region()),
        split_keys: split_keys.iter().map(|k| k.to_vec()).collect(),
        ids: ids(new_ids),
        cb: Some(cb),
    });
    s.round(&mut r.fsm, vec![msg]);
    s.settle(r);
    must_answer(&res)
}

#[test]
fn an_applied_split_creates_the_new_region_with_its_range_and_epoch() {
    let mut s = TestStore::new(1);
    let mut r = s.leader_region(1, b"a", b"z");
    let before = crate::util::epoch(r.fsm.peer.region());
    let resp = split(&mut s, &mut r, &[b"m"], &[(2, 21)]).unwrap();
    let derived = r.fsm.peer.region().clone();
    assert_eq!(
        (&derived.start_key[..], &derived.end_key[..]),
        (&b"a"[..], &b"m"[..])
    );
    let ep = crate::util::epoch(&derived);
    assert_eq!(
        (ep.version, ep.conf_ver),
        (before.version + 1, before.conf_ver)
    );
    let new = resp
        .regions
        .iter()
        .find(|x| x.id == 2)
        .expect("the new region")
        .clone();
    assert_eq!(
        (&new.start_key[..], &new.end_key[..]),
        (&b"m"[..], &b"z"[..])
    );
    assert_eq!(new.region_epoch, derived.region_epoch);
    assert_eq!(
        new.peers
            .iter()
            .map(|p| (p.id, p.store_id))
            .collect::<Vec<_>>(),
        vec![(21, 1)]
    );
    // Both ranges are in the store's map and on disk; the new peer exists.
    let meta = s.ctx.meta.lock();
    assert_eq!(meta.region_for_key(b"b").unwrap().id, 1);
    assert_eq!(meta.region_for_key(b"q").unwrap().id, 2);
    drop(meta);
    assert!(s.ctx.router.mailbox(2).is_some());
    let st = crate::raft::storage::load_region_state(s.engine(), 2)
        .unwrap()
        .unwrap();
    assert_eq!(st.state, PeerState::Normal as i32);
    assert_eq!(st.region.unwrap(), new);
    let parent = crate::raft::storage::load_region_state(s.engine(), 1)
        .unwrap()
        .unwrap();
    assert_eq!(parent.region.unwrap(), derived);
}

#[test]
fn a_batch_split_chains_the_ranges_and_keeps_an_unbounded_end() {
    let (mut s, mut r) = TestStore::single_leader();
    let resp = split(&mut s, &mut r, &[b"g", b"p"], &[(2, 21), (3, 31)]).unwrap();
    let ranges: Vec<(u64, Vec<u8>, Vec<u8>)> = resp
        .regions
        .iter()
        .map(|x| (x.id, x.start_key.clone(), x.end_key.clone()))
        .collect();
    assert_eq!(
        ranges,
        vec![
            (1, b"".to_vec(), b"g".to_vec()),
            (2, b"g".to_vec(), b"p".to_vec()),
            (3, b"p".to_vec(), b"".to_vec()),
        ]
    );
    assert!(resp
        .regions
        .iter()
        .all(|x| crate::util::epoch(x).version == 3));
}

#[test]
fn a_split_with_the_wrong_number_of_ids_is_refused() {
    let (mut s, mut r) = TestStore::single_leader();
    let last = r.fsm.peer.raft_group.store().last_index();
    let err = split(&mut s, &mut r, &[b"g", b"p"], &[(2, 21)]).unwrap_err();
    assert!(matches!(err, Error::Other(_)));
    must_not_append(&r, last);
}

#[test]
fn a_split_of_a_stale_epoch_is_refused() {
    let (mut s, mut r) = TestStore::single_leader();
    let (cb, res) = capture();
    let msg = PeerMsg::Casual(CasualMessage::SplitRegion {
        epoch: stale_epoch(),
        split_keys: vec![b"k".to_vec()],
        cb: Some(cb),
    });
    s.round(&mut r.fsm, vec![msg]);
    assert!(matches!(must_fail(&res), Error::EpochNotMatch { .. }));
}
