//! Raft storage over the memory engine: log bounds, terms, compaction, snapshots, deletion.

use crate::raft::storage::{self, PeerStorage, RAFT_INIT_LOG_INDEX, RAFT_INIT_LOG_TERM};
use atoll_engine::memory::MemoryEngine;
use atoll_engine::{Iterable, KvEngine, Peekable, CF_RAFT};
use atoll_proto::metapb;
use atoll_proto::raft_serverpb::{PeerState, SnapshotMeta};
use raft::eraftpb::{Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, Storage, StorageError};

const FIRST: u64 = RAFT_INIT_LOG_INDEX + 1;

fn region() -> metapb::Region {
    crate::test_support::region_of(1, b"", b"", &[(2, 1)])
}

fn new_storage(engine: &MemoryEngine, cache_limit: usize) -> PeerStorage<MemoryEngine> {
    crate::bootstrap::prepare_bootstrap_region(engine, &region()).unwrap();
    PeerStorage::new(engine.clone(), region(), "[test]".into(), cache_limit).unwrap()
}

fn entries(from: u64, to: u64, term: u64) -> Vec<Entry> {
    (from..to)
        .map(|index| Entry {
            index,
            term,
            data: vec![index as u8; 8].into(),
            ..Default::default()
        })
        .collect()
}

/// Appends `ents` and writes them, as one poll round would.
fn must_append(engine: &MemoryEngine, s: &mut PeerStorage<MemoryEngine>, ents: &[Entry]) {
    let mut wb = engine.write_batch();
    s.append(ents, &mut wb).unwrap();
    s.save_raft_state(&mut wb).unwrap();
    engine.write(wb, true).unwrap();
}

fn all(s: &PeerStorage<MemoryEngine>, low: u64, high: u64) -> raft::Result<Vec<Entry>> {
    s.entries(low, high, None, GetEntriesContext::empty(false))
}

#[test]
fn a_fresh_log_starts_after_the_initial_index() {
    let engine = MemoryEngine::new();
    let s = new_storage(&engine, 1 << 20);
    assert_eq!(s.first_index().unwrap(), FIRST);
    assert_eq!(Storage::last_index(&s).unwrap(), RAFT_INIT_LOG_INDEX);
    assert_eq!(s.term(RAFT_INIT_LOG_INDEX).unwrap(), RAFT_INIT_LOG_TERM);
    let st = s.initial_state().unwrap();
    assert_eq!(st.hard_state.commit, RAFT_INIT_LOG_INDEX);
    assert_eq!(st.conf_state.voters, vec![2]);
}

#[test]
fn appended_entries_are_read_back_with_their_terms() {
    let engine = MemoryEngine::new();
    let mut s = new_storage(&engine, 1 << 20);
    must_append(&engine, &mut s, &entries(FIRST, FIRST + 5, 6));
    assert_eq!(Storage::last_index(&s).unwrap(), FIRST + 4);
    let got = all(&s, FIRST, FIRST + 5).unwrap();
    assert_eq!(got, entries(FIRST, FIRST + 5, 6));
    assert_eq!(s.term(FIRST + 2).unwrap(), 6);
    // A size limit returns a prefix, never nothing.
    let one = s
        .entries(FIRST, FIRST + 5, Some(1), GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(one.len(), 1);
    // The states survive a restart.
    let again = PeerStorage::new(engine.clone(), region(), "[test]".into(), 1 << 20).unwrap();
    assert_eq!(again.last_index(), FIRST + 4);
    assert_eq!(all(&again, FIRST, FIRST + 5).unwrap().len(), 5);
}

#[test]
fn reads_outside_the_log_are_compacted_or_unavailable() {
    let engine = MemoryEngine::new();
    let mut s = new_storage(&engine, 1 << 20);
    must_append(&engine, &mut s, &entries(FIRST, FIRST + 3, 6));
    assert!(matches!(
        all(&s, RAFT_INIT_LOG_INDEX, FIRST + 1),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert!(matches!(
        s.term(RAFT_INIT_LOG_INDEX - 1),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert!(matches!(
        s.term(FIRST + 3),
        Err(raft::Error::Store(StorageError::Unavailable))
    ));
    assert!(all(&s, FIRST, FIRST + 4).is_err(), "past the last index");
}

/// A conflicting append replaces the suffix: the old entries leave the engine too.
#[test]
fn a_conflicting_append_truncates_the_old_suffix() {
    let engine = MemoryEngine::new();
    let mut s = new_storage(&engine, 1 << 20);
    must_append(&engine, &mut s, &entries(FIRST, FIRST + 5, 6));
    must_append(&engine, &mut s, &entries(FIRST + 2, FIRST + 3, 7));
    assert_eq!(s.last_index(), FIRST + 2);
    assert_eq!(s.term(FIRST + 2).unwrap(), 7);
    assert_eq!(s.term(FIRST + 1).unwrap(), 6);
    for i in FIRST + 3..FIRST + 5 {
        let key = atoll_keys::raft_log_key(1, i);
        assert!(
            engine.get_value_cf(CF_RAFT, &key).unwrap().is_none(),
            "stale entry {i}"
        );
    }
}

#[test]
fn compaction_moves_the_first_index_and_keeps_the_term_of_the_truncated_entry() {
    let engine = MemoryEngine::new();
    let mut s = new_storage(&engine, 1 << 20);
    must_append(&engine, &mut s, &entries(FIRST, FIRST + 5, 6));
    s.compact_to(FIRST + 2, 6);
    assert_eq!(s.first_index().unwrap(), FIRST + 3);
    assert_eq!(s.term(FIRST + 2).unwrap(), 6);
    assert!(matches!(
        all(&s, FIRST + 2, FIRST + 4),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert_eq!(all(&s, FIRST + 3, FIRST + 5).unwrap().len(), 2);
    // Never backwards.
    s.compact_to(FIRST, 6);
    assert_eq!(s.truncated_index(), FIRST + 2);
}

/// Entries evicted from the cache once applied are read back from the engine.
#[test]
fn applied_entries_leave_the_cache_but_stay_readable() {
    let engine = MemoryEngine::new();
    let mut s = new_storage(&engine, 0);
    must_append(&engine, &mut s, &entries(FIRST, FIRST + 4, 6));
    s.set_applied(FIRST + 3, 6);
    s.clear_cache();
    assert_eq!(
        all(&s, FIRST, FIRST + 4).unwrap(),
        entries(FIRST, FIRST + 4, 6)
    );
    assert_eq!(s.term(FIRST + 1).unwrap(), 6);
}

#[test]
fn a_received_snapshot_replaces_the_log_and_states() {
    let engine = MemoryEngine::new();
    let mut s = new_storage(&engine, 1 << 20);
    must_append(&engine, &mut s, &entries(FIRST, FIRST + 5, 6));
    let mut hs = HardState::default();
    (hs.term, hs.commit) = (8, FIRST + 4);
    s.set_hard_state(&hs);
    let mut r = region();
    r.end_key = b"m".to_vec();
    let meta = SnapshotMeta {
        region: Some(r.clone()),
        index: 20,
        term: 8,
        ..Default::default()
    };
    let mut snap = Snapshot {
        data: prost::Message::encode_to_vec(&meta).into(),
        ..Default::default()
    };
    snap.set_metadata(SnapshotMetadata {
        index: 20,
        term: 8,
        ..Default::default()
    });
    let mut wb = engine.write_batch();
    s.apply_snapshot_meta(&snap, &mut wb).unwrap();
    s.save_raft_state(&mut wb).unwrap();
    engine.write(wb, true).unwrap();
    assert_eq!(
        (s.last_index(), s.truncated_index(), s.applied_index()),
        (20, 20, 20)
    );
    assert_eq!(s.region, r);
    for i in FIRST..FIRST + 5 {
        let key = atoll_keys::raft_log_key(1, i);
        assert!(engine.get_value_cf(CF_RAFT, &key).unwrap().is_none());
    }
    let st = storage::load_region_state(&engine, 1).unwrap().unwrap();
    assert_eq!(
        st.state,
        PeerState::Applying as i32,
        "applying until the data is in"
    );
    let apply = storage::load_apply_state(&engine, 1).unwrap().unwrap();
    assert_eq!(apply.applied_index, 20);
}

#[test]
fn clearing_raft_state_removes_states_and_log() {
    let engine = MemoryEngine::new();
    let mut s = new_storage(&engine, 1 << 20);
    must_append(&engine, &mut s, &entries(FIRST, FIRST + 3, 6));
    storage::clear_raft_state(&engine, 1, false).unwrap();
    assert!(storage::load_raft_state(&engine, 1).unwrap().is_none());
    assert!(storage::load_apply_state(&engine, 1).unwrap().is_none());
    assert!(storage::load_region_state(&engine, 1).unwrap().is_some());
    let (start, end) = atoll_keys::raft_log_range(1);
    let mut left = 0;
    engine
        .scan_cf(CF_RAFT, &start, Some(&end), false, |_, _| {
            left += 1;
            Ok(true)
        })
        .unwrap();
    assert_eq!(left, 0, "log entries left");
    storage::clear_raft_state(&engine, 1, true).unwrap();
    assert!(storage::load_region_state(&engine, 1).unwrap().is_none());
}

/// A snapshot is generated asynchronously: the first ask leaves a request for the peer.
#[test]
fn a_snapshot_is_requested_not_built_inline() {
    let engine = MemoryEngine::new();
    let s = new_storage(&engine, 1 << 20);
    assert!(matches!(
        s.snapshot(FIRST, 2),
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable
        ))
    ));
    let req = s.take_gen_request().expect("a generation request");
    assert_eq!(req.request_index, FIRST);
    assert!(s.take_gen_request().is_none());
}

fn entry(index: u64, bytes: usize) -> Entry {
    Entry {
        index,
        term: RAFT_INIT_LOG_TERM,
        data: vec![7u8; bytes].into(),
        ..Default::default()
    }
}

/// A follower whose apply stalls keeps appending: the entry cache stays near its limit
/// (what is on disk is evicted, applied or not) and every entry is still readable.
#[test]
fn entry_cache_stays_bounded_when_apply_stalls() {
    let engine = MemoryEngine::new();
    let mut s = new_storage(&engine, 64 << 10);
    let mut next = RAFT_INIT_LOG_INDEX + 1;
    for _round in 0..100 {
        let batch: Vec<Entry> = (0..4).map(|i| entry(next + i, 4 << 10)).collect();
        next += 4;
        let mut wb = engine.write_batch();
        s.append(&batch, &mut wb).unwrap();
        engine.write(wb, true).unwrap();
        assert!(
            s.cached_bytes() <= (64 << 10) + 4 * (5 << 10),
            "cache holds {} bytes with nothing applied",
            s.cached_bytes()
        );
    }
    assert_eq!(s.apply_state.applied_index, RAFT_INIT_LOG_INDEX);
    let all = s
        .entries(
            RAFT_INIT_LOG_INDEX + 1,
            next,
            None,
            GetEntriesContext::empty(false),
        )
        .unwrap();
    assert_eq!(all.len() as u64, next - RAFT_INIT_LOG_INDEX - 1);
    assert!(all.windows(2).all(|w| w[1].index == w[0].index + 1));
}

/// While the peer holds committed entries back (apply is behind), fetches for the apply
/// side get nothing; fetches that may be asynchronous (appends to followers) still work.
#[test]
fn held_fetches_return_nothing_but_appends_still_read() {
    let engine = MemoryEngine::new();
    let mut s = new_storage(&engine, 1 << 20);
    let batch: Vec<Entry> = (1..=3)
        .map(|i| entry(RAFT_INIT_LOG_INDEX + i, 10))
        .collect();
    let mut wb = engine.write_batch();
    s.append(&batch, &mut wb).unwrap();
    engine.write(wb, true).unwrap();
    let (lo, hi) = (RAFT_INIT_LOG_INDEX + 1, RAFT_INIT_LOG_INDEX + 4);
    s.hold_committed = true;
    assert!(s
        .entries(lo, hi, None, GetEntriesContext::empty(false))
        .unwrap()
        .is_empty());
    assert_eq!(
        s.entries(lo, hi, None, GetEntriesContext::empty(true))
            .unwrap()
            .len(),
        3
    );
    s.hold_committed = false;
    assert_eq!(
        s.entries(lo, hi, None, GetEntriesContext::empty(false))
            .unwrap()
            .len(),
        3
    );
}

/// A crash after the apply side wrote its state for entries the raft side learnt were
/// committed, before the round that persists that commit index: on restart the applied index is
/// past the persisted commit. The storage forwards the commit index, and raft starts (it used
/// to panic: "applied(8) is out of range [prev_applied(5), min(committed(5), persisted(9))]",
/// seen on a store restarted by scripts/bench-scale.sh).
#[test]
fn a_restart_with_applied_past_the_persisted_commit_forwards_the_commit() {
    let engine = MemoryEngine::new();
    let mut s = new_storage(&engine, 1 << 20);
    must_append(&engine, &mut s, &entries(FIRST, 10, RAFT_INIT_LOG_TERM));
    assert_eq!(s.raft_state.commit, RAFT_INIT_LOG_INDEX);
    let mut wb = engine.write_batch();
    let mut apply = storage::initial_apply_state();
    apply.applied_index = 8;
    apply.applied_term = RAFT_INIT_LOG_TERM;
    storage::write_apply_state(&mut wb, 1, &apply).unwrap();
    engine.write(wb, true).unwrap();

    let s = PeerStorage::new(engine.clone(), region(), "[test]".into(), 1 << 20).unwrap();
    assert_eq!(s.initial_state().unwrap().hard_state.commit, 8);
    let cfg = raft::Config {
        id: 2,
        applied: s.applied_index(),
        ..Default::default()
    };
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let node = raft::RawNode::new(&cfg, s, &logger).unwrap();
    assert_eq!(node.raft.raft_log.committed, 8);
    assert_eq!(node.raft.raft_log.applied, 8);
}
