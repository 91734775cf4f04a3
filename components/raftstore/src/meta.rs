//! `StoreMeta`: what the whole store knows about its regions, shared under one lock by the
//! pollers, the store thread and the KV service: the range index (which region holds a key,
//! whether a new range overlaps), the read delegates (who may serve leader snapshots), and
//! messages parked for regions that a pending split will create.

use crate::util;
use atoll_proto::metapb;
use atoll_proto::raft_serverpb::RaftMessage;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A region's end key as a map key: the empty (unbounded) end sorts last.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RangeEnd {
    Key(Vec<u8>),
    Infinity,
}

impl RangeEnd {
    pub fn of(end_key: &[u8]) -> Self {
        match util::region_end(end_key) {
            Some(k) => RangeEnd::Key(k.to_vec()),
            None => RangeEnd::Infinity,
        }
    }
}

/// A leader's lease: until when it may answer reads from its own applied state without a
/// ReadIndex round. Renewed only by the region's raft poller (from the time a request that a
/// quorum has since acknowledged was sent), read by any thread. One lease belongs to one
/// leadership (term); a new term gets a new lease.
#[derive(Debug)]
pub struct LeaderLease {
    base: Instant,
    /// Nanoseconds after `base` the lease runs until; 0 = no lease.
    until: AtomicU64,
    /// A renewal was asked for ahead of expiry and has not landed yet.
    renewing: AtomicBool,
}

impl LeaderLease {
    pub fn new() -> Self {
        LeaderLease {
            base: Instant::now(),
            until: AtomicU64::new(0),
            renewing: AtomicBool::new(false),
        }
    }

    /// Extends the lease to `from + len` (never shortens it).
    pub fn renew(&self, from: Instant, len: Duration) {
        let until = (from + len).saturating_duration_since(self.base).as_nanos() as u64;
        self.until.fetch_max(until.max(1), Ordering::SeqCst);
        self.renewing.store(false, Ordering::SeqCst);
    }

    /// Whether the caller should ask for a renewal now: less than `ahead` is left, and nobody
    /// else has asked since the last renewal (so that a steady read load keeps the lease
    /// without ever finding it expired).
    pub fn take_renewal(&self, now: Instant, ahead: Duration) -> bool {
        let until = self.until.load(Ordering::SeqCst);
        let left = until.saturating_sub(now.saturating_duration_since(self.base).as_nanos() as u64);
        left < ahead.as_nanos() as u64 && !self.renewing.swap(true, Ordering::SeqCst)
    }

    /// Ends the lease at once.
    pub fn expire(&self) {
        self.until.store(0, Ordering::SeqCst);
    }

    pub fn is_valid_at(&self, now: Instant) -> bool {
        let until = self.until.load(Ordering::SeqCst);
        until != 0 && (now.saturating_duration_since(self.base).as_nanos() as u64) < until
    }
}

impl Default for LeaderLease {
    fn default() -> Self {
        Self::new()
    }
}

/// Who may serve a local leader snapshot of a region, and from what state.
#[derive(Clone, Debug)]
pub struct ReadDelegate {
    pub region: Arc<metapb::Region>,
    pub peer: metapb::Peer,
    /// Raft term of the current leadership (0 when not leader).
    pub term: u64,
    /// Leader, and has applied an entry of its own term: every write committed before it
    /// became leader is applied, so its local snapshot sees every committed write.
    pub leader_ready: bool,
    pub leader: Option<metapb::Peer>,
    /// The leader's lease (always expired on a follower).
    pub lease: Arc<LeaderLease>,
    pub approximate_size: u64,
    pub approximate_keys: u64,
}

pub const MAX_PARKED_MSGS_PER_REGION: usize = 32;

#[derive(Default)]
pub struct StoreMeta {
    pub store_id: u64,
    /// Initialized regions hosted here (latest local view).
    pub regions: HashMap<u64, metapb::Region>,
    /// end key -> region id, for every initialized region.
    pub region_ranges: BTreeMap<RangeEnd, u64>,
    pub readers: HashMap<u64, ReadDelegate>,
    /// Messages for regions not created yet because an existing region still covers
    /// their range (a split in flight).
    pub parked_msgs: HashMap<u64, Vec<(Instant, RaftMessage)>>,
}

impl StoreMeta {
    pub fn new(store_id: u64) -> Self {
        StoreMeta {
            store_id,
            ..Default::default()
        }
    }

    /// Inserts or updates an initialized region's range.
    pub fn set_region(&mut self, region: &metapb::Region) {
        if let Some(old) = self.regions.get(&region.id) {
            let old_end = RangeEnd::of(&old.end_key);
            if self.region_ranges.get(&old_end) == Some(&region.id) {
                self.region_ranges.remove(&old_end);
            }
        }
        self.region_ranges
            .insert(RangeEnd::of(&region.end_key), region.id);
        self.regions.insert(region.id, region.clone());
        if let Some(d) = self.readers.get_mut(&region.id) {
            d.region = Arc::new(region.clone());
        }
    }

    pub fn remove_region(&mut self, region_id: u64) -> Option<metapb::Region> {
        let r = self.regions.remove(&region_id)?;
        let end = RangeEnd::of(&r.end_key);
        if self.region_ranges.get(&end) == Some(&region_id) {
            self.region_ranges.remove(&end);
        }
        self.readers.remove(&region_id);
        Some(r)
    }

    /// The region holding user key `key`.
    pub fn region_for_key(&self, key: &[u8]) -> Option<&metapb::Region> {
        let (_, id) = self
            .region_ranges
            .range((
                std::ops::Bound::Excluded(RangeEnd::Key(key.to_vec())),
                std::ops::Bound::Unbounded,
            ))
            .next()?;
        let r = self.regions.get(id)?;
        (r.start_key.as_slice() <= key).then_some(r)
    }

    /// Regions (other than `except`) overlapping `[start, end)`.
    pub fn overlapping(&self, start: &[u8], end: &[u8], except: u64) -> Vec<u64> {
        let mut out = vec![];
        for (_, id) in self.region_ranges.range((
            std::ops::Bound::Excluded(RangeEnd::Key(start.to_vec())),
            std::ops::Bound::Unbounded,
        )) {
            let Some(r) = self.regions.get(id) else {
                continue;
            };
            if !util::is_before_end(&r.start_key, end) {
                break;
            }
            if *id != except && atoll_keys::ranges_overlap(start, end, &r.start_key, &r.end_key) {
                out.push(*id);
            }
        }
        out
    }

    pub fn park_msg(&mut self, msg: RaftMessage) {
        let q = self.parked_msgs.entry(msg.region_id).or_default();
        if q.len() >= MAX_PARKED_MSGS_PER_REGION {
            q.remove(0);
        }
        q.push((Instant::now(), msg));
    }

    pub fn take_parked(&mut self, region_id: u64) -> Vec<RaftMessage> {
        self.parked_msgs
            .remove(&region_id)
            .map(|v| v.into_iter().map(|(_, m)| m).collect())
            .unwrap_or_default()
    }

    /// Drops parked messages older than `max_age`.
    pub fn expire_parked(&mut self, max_age: std::time::Duration) {
        let now = Instant::now();
        self.parked_msgs.retain(|_, v| {
            v.retain(|(t, _)| now.duration_since(*t) < max_age);
            !v.is_empty()
        });
    }

    pub fn leader_count(&self) -> usize {
        self.readers.values().filter(|d| d.term > 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: u64, s: &[u8], e: &[u8]) -> metapb::Region {
        metapb::Region {
            id,
            start_key: s.to_vec(),
            end_key: e.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn range_index() {
        let mut m = StoreMeta::new(1);
        m.set_region(&r(1, b"", b"m"));
        m.set_region(&r(2, b"m", b""));
        assert_eq!(m.region_for_key(b"a").unwrap().id, 1);
        assert_eq!(m.region_for_key(b"m").unwrap().id, 2);
        assert_eq!(m.region_for_key(b"zzz").unwrap().id, 2);
        assert_eq!(m.overlapping(b"k", b"n", 0), vec![1, 2]);
        assert_eq!(m.overlapping(b"m", b"", 2), Vec::<u64>::new());
        assert_eq!(m.overlapping(b"a", b"b", 0), vec![1]);
        // Shrink region 1 (a split) and add the new one.
        m.set_region(&r(1, b"", b"f"));
        m.set_region(&r(3, b"f", b"m"));
        assert_eq!(m.region_for_key(b"g").unwrap().id, 3);
        assert_eq!(m.region_for_key(b"a").unwrap().id, 1);
        m.remove_region(3);
        assert!(m.region_for_key(b"g").is_none());
        assert!(m.overlapping(b"g", b"h", 0).is_empty());
    }
}
