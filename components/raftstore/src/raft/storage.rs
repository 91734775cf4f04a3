//! `PeerStorage`: raft-rs's `Storage` for one peer, over the shared engine.
//!
//! Layout (column family `raft`, keys from `atoll_keys`): log entries, the raft local state
//! (hard state + last index/term), the apply state (applied index + truncated state, written
//! by the apply side atomically with the data), and the region local state.
//!
//! The raft side keeps recent entries in an in-memory cache so that appending, sending and
//! applying rarely read the engine. Snapshots are generated asynchronously: `snapshot()`
//! returns `SnapshotTemporarilyUnavailable` and leaves a request for the peer to schedule.

use crate::util::{conf_state_from_region, decode_msg, encode_msg};
use atoll_engine::{KvEngine, Peekable, WriteBatch, CF_RAFT};
use atoll_proto::metapb;
use atoll_proto::raft_serverpb::{
    PeerState, RaftApplyState, RaftLocalState, RaftTruncatedState, RegionLocalState, SnapshotMeta,
};
use parking_lot::Mutex;
use protobuf::Message as PbMessage;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;

/// Log position a region starts from when bootstrapped or created by a split.
pub const RAFT_INIT_LOG_INDEX: u64 = 5;
pub const RAFT_INIT_LOG_TERM: u64 = 5;

pub fn initial_raft_state() -> RaftLocalState {
    RaftLocalState {
        term: RAFT_INIT_LOG_TERM,
        vote: 0,
        commit: RAFT_INIT_LOG_INDEX,
        last_index: RAFT_INIT_LOG_INDEX,
        last_term: RAFT_INIT_LOG_TERM,
    }
}

pub fn initial_apply_state() -> RaftApplyState {
    RaftApplyState {
        applied_index: RAFT_INIT_LOG_INDEX,
        applied_term: RAFT_INIT_LOG_TERM,
        truncated_state: Some(RaftTruncatedState {
            index: RAFT_INIT_LOG_INDEX,
            term: RAFT_INIT_LOG_TERM,
        }),
    }
}

/// Writes the states of a region that starts life initialized (bootstrap or split).
pub fn write_initial_states(
    wb: &mut impl WriteBatch,
    region: &metapb::Region,
) -> atoll_engine::Result<()> {
    write_raft_state(wb, region.id, &initial_raft_state())?;
    write_apply_state(wb, region.id, &initial_apply_state())?;
    write_region_state(wb, region, PeerState::Normal)
}

type EngineResult<T> = atoll_engine::Result<T>;

fn put_state(
    wb: &mut impl WriteBatch,
    key: &[u8],
    state: &impl prost::Message,
) -> EngineResult<()> {
    wb.put_cf(CF_RAFT, key, &encode_msg(state))
}

pub fn write_raft_state(wb: &mut impl WriteBatch, id: u64, s: &RaftLocalState) -> EngineResult<()> {
    put_state(wb, &atoll_keys::raft_state_key(id), s)
}

pub fn write_apply_state(
    wb: &mut impl WriteBatch,
    id: u64,
    s: &RaftApplyState,
) -> EngineResult<()> {
    put_state(wb, &atoll_keys::apply_state_key(id), s)
}

/// Stages the deletion of log entries `[from, to)` of a region.
pub fn delete_log(
    wb: &mut impl WriteBatch,
    region_id: u64,
    from: u64,
    to: u64,
) -> atoll_engine::Result<()> {
    wb.delete_range_cf(
        CF_RAFT,
        &atoll_keys::raft_log_key(region_id, from),
        &atoll_keys::raft_log_key(region_id, to),
    )
}

/// Stages the deletion of a region's raft state, apply state and whole raft log (a peer that
/// is gone: destroyed, or left half-destroyed by a crash). The one place that knows what a
/// peer's raft state consists of.
pub fn delete_raft_state(wb: &mut impl WriteBatch, region_id: u64) -> atoll_engine::Result<()> {
    wb.delete_cf(CF_RAFT, &atoll_keys::raft_state_key(region_id))?;
    wb.delete_cf(CF_RAFT, &atoll_keys::apply_state_key(region_id))?;
    let (s, e) = atoll_keys::raft_log_range(region_id);
    wb.delete_range_cf(CF_RAFT, &s, &e)
}

/// Deletes a region's raft state now, in a synced write of its own ([`delete_raft_state`]);
/// with `and_region_state` its region state too (nothing of the region is left).
pub fn clear_raft_state(
    engine: &impl KvEngine,
    region_id: u64,
    and_region_state: bool,
) -> crate::Result<()> {
    let mut wb = engine.write_batch();
    delete_raft_state(&mut wb, region_id)?;
    if and_region_state {
        wb.delete_cf(CF_RAFT, &atoll_keys::region_state_key(region_id))?;
    }
    engine.write(wb, true)?;
    Ok(())
}

pub fn write_region_state(
    wb: &mut impl WriteBatch,
    region: &metapb::Region,
    state: PeerState,
) -> atoll_engine::Result<()> {
    let s = RegionLocalState {
        state: state as i32,
        region: Some(region.clone()),
    };
    put_state(wb, &atoll_keys::region_state_key(region.id), &s)
}

fn load_state<M: prost::Message + Default>(
    engine: &impl Peekable,
    key: &[u8],
) -> crate::Result<Option<M>> {
    match engine.get_value_cf(CF_RAFT, key)? {
        Some(v) => Ok(Some(decode_msg(&v)?)),
        None => Ok(None),
    }
}

pub fn load_raft_state(e: &impl Peekable, id: u64) -> crate::Result<Option<RaftLocalState>> {
    load_state(e, &atoll_keys::raft_state_key(id))
}

pub fn load_apply_state(e: &impl Peekable, id: u64) -> crate::Result<Option<RaftApplyState>> {
    load_state(e, &atoll_keys::apply_state_key(id))
}

pub fn load_region_state(e: &impl Peekable, id: u64) -> crate::Result<Option<RegionLocalState>> {
    load_state(e, &atoll_keys::region_state_key(id))
}

#[derive(Default)]
struct EntryCache {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl EntryCache {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.index)
    }

    fn append(&mut self, ents: &[Entry]) {
        let Some(first) = ents.first() else { return };
        if let Some(cache_first) = self.first_index() {
            let cache_last = cache_first + self.entries.len() as u64 - 1;
            if first.index <= cache_first || first.index > cache_last + 1 {
                self.clear();
            } else if first.index <= cache_last {
                // Conflicting suffix: drop it.
                let keep = (first.index - cache_first) as usize;
                for e in self.entries.drain(keep..) {
                    self.bytes -= e.compute_size() as usize;
                }
            }
        }
        for e in ents {
            self.bytes += e.compute_size() as usize;
            self.entries.push_back(e.clone());
        }
    }

    fn get(&self, idx: u64) -> Option<&Entry> {
        let first = self.first_index()?;
        if idx < first {
            return None;
        }
        self.entries.get((idx - first) as usize)
    }

    /// Drops entries below `idx`.
    fn compact_to(&mut self, idx: u64) {
        while let Some(e) = self.entries.front() {
            if e.index >= idx {
                break;
            }
            self.bytes -= e.compute_size() as usize;
            self.entries.pop_front();
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

/// A snapshot the peer must have generated (taken by the peer after each raft call).
pub struct GenSnapRequest {
    pub request_index: u64,
    pub slot: Arc<Mutex<Option<Result<Snapshot, String>>>>,
}

enum SnapState {
    Relax,
    Generating(Arc<Mutex<Option<Result<Snapshot, String>>>>),
}

pub struct PeerStorage<E: KvEngine> {
    pub engine: E,
    pub region: metapb::Region,
    pub raft_state: RaftLocalState,
    /// The truncated state; `applied_index` here is the raft side's view of apply progress.
    pub apply_state: RaftApplyState,
    cache: EntryCache,
    cache_limit: usize,
    snap_state: RefCell<SnapState>,
    gen_request: RefCell<Option<GenSnapRequest>>,
    /// The last snapshot generated, reusable while still ahead of the truncated index.
    last_snapshot: RefCell<Option<Snapshot>>,
    pub tag: String,
    /// Set by the peer around `RawNode::ready()` and `advance_append()` when apply is behind:
    /// the committed entries they would fetch for the apply side stay in the log.
    pub hold_committed: bool,
}

impl<E: KvEngine> PeerStorage<E> {
    /// Loads a peer's states (or fresh ones for a peer that still waits for a snapshot).
    pub fn new(
        engine: E,
        region: metapb::Region,
        tag: String,
        cache_limit: usize,
    ) -> crate::Result<Self> {
        let mut raft_state = load_raft_state(&engine, region.id)?.unwrap_or_default();
        let apply_state = load_apply_state(&engine, region.id)?.unwrap_or_default();
        if apply_state.applied_index > raft_state.commit {
            // Entries a round learnt were committed (raft-rs's light ready after the append)
            // go to the apply side at once, while the commit index that says so is persisted
            // with the next round's hard state: a crash in between leaves the apply state
            // ahead of the persisted commit. Applied entries were committed, so the commit
            // index moves up to them (raft-rs refuses to start with applied > committed).
            if apply_state.applied_index > raft_state.last_index {
                return Err(crate::Error::Other(format!(
                    "{tag} applied index {} is past the last log index {}",
                    apply_state.applied_index, raft_state.last_index
                )));
            }
            tracing::info!(
                tag = %tag,
                commit = raft_state.commit,
                applied = apply_state.applied_index,
                "commit index forwarded to the applied index"
            );
            raft_state.commit = apply_state.applied_index;
        }
        Ok(PeerStorage {
            engine,
            region,
            raft_state,
            apply_state,
            cache: EntryCache::default(),
            cache_limit,
            snap_state: RefCell::new(SnapState::Relax),
            gen_request: RefCell::new(None),
            last_snapshot: RefCell::new(None),
            tag,
            hold_committed: false,
        })
    }

    pub fn is_initialized(&self) -> bool {
        !self.region.peers.is_empty()
    }

    pub fn truncated_index(&self) -> u64 {
        self.apply_state
            .truncated_state
            .as_ref()
            .map_or(0, |t| t.index)
    }

    pub fn truncated_term(&self) -> u64 {
        self.apply_state
            .truncated_state
            .as_ref()
            .map_or(0, |t| t.term)
    }

    pub fn applied_index(&self) -> u64 {
        self.apply_state.applied_index
    }

    pub fn last_index(&self) -> u64 {
        self.raft_state.last_index
    }

    pub fn take_gen_request(&self) -> Option<GenSnapRequest> {
        self.gen_request.borrow_mut().take()
    }

    fn fetch_entries_from_engine(
        &self,
        low: u64,
        high: u64,
        max_size: u64,
        out: &mut Vec<Entry>,
    ) -> raft::Result<u64> {
        let region_id = self.region.id;
        let start = atoll_keys::raft_log_key(region_id, low);
        let end = atoll_keys::raft_log_key(region_id, high);
        let mut size = 0u64;
        let mut next = low;
        let mut err = None;
        let res = self
            .engine
            .scan_cf(CF_RAFT, &start, Some(&end), true, |_, v| {
                let e = match Entry::parse_from_bytes(v) {
                    Ok(e) => e,
                    Err(e) => {
                        err = Some(format!("corrupt raft entry: {e}"));
                        return Ok(false);
                    }
                };
                if e.index != next {
                    err = Some(format!("raft log gap: expected {next}, got {}", e.index));
                    return Ok(false);
                }
                next += 1;
                size += e.compute_size() as u64;
                let stop = !out.is_empty() && size > max_size;
                if !stop {
                    out.push(e);
                }
                Ok(!stop)
            });
        if let Err(e) = res {
            return Err(raft::Error::Store(StorageError::Other(Box::new(e))));
        }
        if let Some(e) = err {
            return Err(raft::Error::Store(StorageError::Other(e.into())));
        }
        if next != high && size <= max_size {
            // Entries that should exist are missing: the log was compacted under us.
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(size)
    }

    // ---- writes (into the poller's batch) ----

    /// Appends entries from a ready, removing any stale suffix.
    pub fn append(&mut self, entries: &[Entry], wb: &mut E::WriteBatch) -> crate::Result<()> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        let region_id = self.region.id;
        for e in entries {
            wb.put_cf(
                CF_RAFT,
                &atoll_keys::raft_log_key(region_id, e.index),
                &e.write_to_bytes()?,
            )?;
        }
        let prev_last = self.raft_state.last_index;
        if last.index < prev_last {
            delete_log(wb, region_id, last.index + 1, prev_last + 1)?;
        }
        debug_assert!(
            first.index <= prev_last + 1,
            "{} appends past its log",
            self.tag
        );
        self.raft_state.last_index = last.index;
        self.raft_state.last_term = last.term;
        self.cache.append(entries);
        // What earlier rounds appended is on disk: past the limit it may go, applied or not
        // (a follower whose apply stalls must not keep its whole log in memory).
        self.evict_cache(first.index);
        Ok(())
    }

    /// Drops the oldest cached entries below `persisted_below` while the cache is over its
    /// limit. Only persisted entries may go: an evicted entry is read back from the engine.
    fn evict_cache(&mut self, persisted_below: u64) {
        while self.cache.bytes > self.cache_limit {
            match self.cache.first_index() {
                Some(i) if i < persisted_below => self.cache.compact_to(i + 1),
                _ => break,
            }
        }
    }

    pub fn set_hard_state(&mut self, hs: &HardState) {
        self.raft_state.term = hs.term;
        self.raft_state.vote = hs.vote;
        self.raft_state.commit = hs.commit;
    }

    pub fn save_raft_state(&self, wb: &mut E::WriteBatch) -> crate::Result<()> {
        write_raft_state(wb, self.region.id, &self.raft_state)?;
        Ok(())
    }

    /// Records a received snapshot: states and region (marked `Applying` until the data is in).
    /// Returns the snapshot's metadata.
    pub fn apply_snapshot_meta(
        &mut self,
        snap: &Snapshot,
        wb: &mut E::WriteBatch,
    ) -> crate::Result<SnapshotMeta> {
        let meta: SnapshotMeta = prost::Message::decode(snap.get_data())?;
        let region = meta
            .region
            .clone()
            .ok_or_else(|| crate::Error::Other("snapshot without region".into()))?;
        let idx = snap.get_metadata().index;
        let term = snap.get_metadata().term;
        let region_id = self.region.id;
        // Every old log entry is superseded.
        delete_log(wb, region_id, 0, idx + 1)?;
        if self.raft_state.last_index > idx {
            delete_log(wb, region_id, idx + 1, self.raft_state.last_index + 1)?;
        }
        self.raft_state.last_index = idx;
        self.raft_state.last_term = term;
        self.raft_state.commit = self.raft_state.commit.max(idx);
        self.apply_state = RaftApplyState {
            applied_index: idx,
            applied_term: term,
            truncated_state: Some(RaftTruncatedState { index: idx, term }),
        };
        write_apply_state(wb, region_id, &self.apply_state)?;
        write_region_state(wb, &region, PeerState::Applying)?;
        self.region = region;
        self.cache.clear();
        *self.last_snapshot.borrow_mut() = None;
        Ok(meta)
    }

    /// The raft side learnt of a compaction applied up to `idx` (term `term`).
    pub fn compact_to(&mut self, idx: u64, term: u64) {
        if idx <= self.truncated_index() {
            return;
        }
        self.apply_state.truncated_state = Some(RaftTruncatedState { index: idx, term });
        self.cache.compact_to(idx + 1);
    }

    pub fn set_applied(&mut self, index: u64, term: u64) {
        self.apply_state.applied_index = index;
        self.apply_state.applied_term = term;
        // Applied entries are persisted.
        self.evict_cache(index + 1);
    }

    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }

    /// Bytes of entries in the cache.
    pub fn cached_bytes(&self) -> usize {
        self.cache.bytes
    }
}

fn storage_err(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

impl<E: KvEngine> raft::Storage for PeerStorage<E> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let hs = HardState {
            term: self.raft_state.term,
            vote: self.raft_state.vote,
            commit: self.raft_state.commit,
            ..Default::default()
        };
        let cs: ConfState = if self.is_initialized() {
            conf_state_from_region(&self.region)
        } else {
            ConfState::default()
        };
        Ok(RaftState::new(hs, cs))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        ctx: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if self.hold_committed && !ctx.can_async() {
            // A fetch of committed entries for the apply side (appends to followers are the
            // fetches that may be asynchronous): raft-rs takes a short answer as a size
            // limit, so nothing is fetched this time.
            return Ok(vec![]);
        }
        let max_size = max_size.into().unwrap_or(u64::MAX);
        if low <= self.truncated_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index() + 1 {
            return Err(storage_err(format!(
                "{} entries [{low}, {high}) past last index {}",
                self.tag,
                self.last_index()
            )));
        }
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        let cache_first = self.cache.first_index().unwrap_or(u64::MAX);
        let mut size = 0u64;
        let mut next = low;
        if low < cache_first {
            let engine_high = high.min(cache_first);
            size = self.fetch_entries_from_engine(low, engine_high, max_size, &mut out)?;
            next = low + out.len() as u64;
            if next < engine_high {
                return Ok(out);
            }
        }
        while next < high {
            let e = self
                .cache
                .get(next)
                .ok_or_else(|| storage_err(format!("{} entry {next} missing", self.tag)))?;
            size += e.compute_size() as u64;
            if !out.is_empty() && size > max_size {
                break;
            }
            out.push(e.clone());
            next += 1;
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.truncated_index() {
            return Ok(self.truncated_term());
        }
        if idx < self.truncated_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if idx == self.last_index() && self.raft_state.last_term != 0 {
            return Ok(self.raft_state.last_term);
        }
        if let Some(e) = self.cache.get(idx) {
            return Ok(e.term);
        }
        let v = self
            .engine
            .get_value_cf(CF_RAFT, &atoll_keys::raft_log_key(self.region.id, idx))
            .map_err(storage_err)?
            .ok_or(raft::Error::Store(StorageError::Unavailable))?;
        let e = Entry::parse_from_bytes(&v).map_err(storage_err)?;
        Ok(e.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.truncated_index() + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.raft_state.last_index)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // A snapshot must name its receiver in its membership (raft refuses it otherwise).
        let includes = |s: &Snapshot| {
            let cs = s.get_metadata().get_conf_state();
            cs.voters.contains(&to) || cs.learners.contains(&to)
        };
        if let Some(s) = self.last_snapshot.borrow().as_ref() {
            let idx = s.get_metadata().index;
            if idx >= request_index && idx >= self.truncated_index() && includes(s) {
                return Ok(s.clone());
            }
        }
        let mut state = self.snap_state.borrow_mut();
        if let SnapState::Generating(slot) = &*state {
            let res = slot.lock().take();
            match res {
                None => {
                    return Err(raft::Error::Store(
                        StorageError::SnapshotTemporarilyUnavailable,
                    ))
                }
                Some(Ok(s)) => {
                    *state = SnapState::Relax;
                    let idx = s.get_metadata().index;
                    if idx >= request_index && idx >= self.truncated_index() && includes(&s) {
                        *self.last_snapshot.borrow_mut() = Some(s.clone());
                        return Ok(s);
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(tag = %self.tag, error = %e, "snapshot generation failed; retrying");
                    *state = SnapState::Relax;
                }
            }
        }
        let slot = Arc::new(Mutex::new(None));
        *self.gen_request.borrow_mut() = Some(GenSnapRequest {
            request_index,
            slot: slot.clone(),
        });
        *state = SnapState::Generating(slot);
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}
