//! PD's replicated state machine: a small key space of metadata, applied from raft entries
//! (`PdCommand`) on every member, persisted in PD's own RocksDB, and kept decoded in memory
//! so that any member that becomes leader serves at once.
//!
//! Keys: `c/cluster_id`, `c/bootstrapped`, `c/id_hwm`, `c/tso`, `c/gc`, `s/<store id>`,
//! `r/<region id>` (a `RegionRecord`), `m/<member id>`.

use atoll_engine::{KvEngine, WriteBatch, CF_DEFAULT, CF_RAFT};
use atoll_proto::pdpb::{self, PdCommand, PdKv, PdSnapshot, RegionRecord};
use atoll_proto::{metapb, Message};
use std::collections::{BTreeMap, HashMap};

pub const KEY_CLUSTER_ID: &[u8] = b"c/cluster_id";
pub const KEY_BOOTSTRAPPED: &[u8] = b"c/bootstrapped";
pub const KEY_ID_HWM: &[u8] = b"c/id_hwm";
pub const KEY_TSO: &[u8] = b"c/tso";
pub const KEY_GC: &[u8] = b"c/gc";
const APPLIED_KEY: &[u8] = b"pd/applied";

pub fn store_key(id: u64) -> Vec<u8> {
    let mut k = b"s/".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}
pub fn region_key(id: u64) -> Vec<u8> {
    let mut k = b"r/".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}
pub fn member_key(id: u64) -> Vec<u8> {
    let mut k = b"m/".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub fn u64_value(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn read_u64(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// Regions by id and by start key, with per-store peer and leader counts kept up to date on
/// every change (so a heartbeat never has to count the whole cluster).
#[derive(Default, Clone)]
pub struct RegionTree {
    regions: HashMap<u64, RegionRecord>,
    by_start: BTreeMap<Vec<u8>, u64>,
    counts: HashMap<u64, StoreCount>,
}

/// How many region peers and leaders a store holds, as the region records say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreCount {
    pub regions: usize,
    pub leaders: usize,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RegionUpdate {
    pub epoch_changed: bool,
    pub leader_changed: bool,
    pub stale: bool,
    /// Regions removed because the new one covers their range with a newer epoch.
    pub removed: Vec<u64>,
}

fn epoch(r: &metapb::Region) -> metapb::RegionEpoch {
    r.region_epoch.unwrap_or_default()
}

impl RegionTree {
    pub fn get(&self, id: u64) -> Option<&RegionRecord> {
        self.regions.get(&id)
    }

    /// Every record, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &RegionRecord> {
        self.regions.values()
    }

    /// The peer and leader counts of `store_id`.
    pub fn store_count(&self, store_id: u64) -> StoreCount {
        self.counts.get(&store_id).copied().unwrap_or_default()
    }

    /// Up to `limit` records in key order from the one holding `from` (the first if `from` is
    /// empty), and where the next call should start: empty once the last region is included,
    /// so repeated calls patrol every region in turn.
    pub fn patrol(&self, from: &[u8], limit: usize) -> (Vec<&RegionRecord>, Vec<u8>) {
        let mut out = Vec::with_capacity(limit.min(self.regions.len()));
        let mut next = vec![];
        for (start, id) in self.by_start.range(from.to_vec()..) {
            if out.len() >= limit {
                next = start.clone();
                break;
            }
            if let Some(rec) = self.regions.get(id) {
                out.push(rec);
            }
        }
        (out, next)
    }

    /// Adds (`add`) or takes away a record's peers and leader from the store counts.
    fn account(&mut self, rec: &RegionRecord, add: bool) {
        let Some(r) = rec.region.as_ref() else { return };
        let mut bump = |store: u64, leader: bool| {
            let c = self.counts.entry(store).or_default();
            let n = if leader {
                &mut c.leaders
            } else {
                &mut c.regions
            };
            if add {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
            }
            if *c == StoreCount::default() {
                self.counts.remove(&store);
            }
        };
        for p in &r.peers {
            bump(p.store_id, false);
        }
        if let Some(l) = rec.leader.as_ref() {
            if r.peers.iter().any(|p| p.id == l.id) {
                bump(l.store_id, true);
            }
        }
    }

    /// Inserts `rec` (replacing the record of the same id) and keeps the indexes.
    fn insert(&mut self, rec: RegionRecord) {
        let Some((id, start)) = rec.region.as_ref().map(|r| (r.id, r.start_key.clone())) else {
            return;
        };
        self.account(&rec, true);
        if let Some(old) = self.regions.get(&id).cloned() {
            self.account(&old, false);
        }
        self.by_start.insert(start, id);
        self.regions.insert(id, rec);
    }

    /// The region holding `key`.
    pub fn search(&self, key: &[u8]) -> Option<&RegionRecord> {
        let (_, id) = self.by_start.range(..=key.to_vec()).next_back()?;
        let rec = self.regions.get(id)?;
        let r = rec.region.as_ref()?;
        atoll_keys::in_range(key, &r.start_key, &r.end_key).then_some(rec)
    }

    /// The region that ends where `key` starts (the last region when `key` is empty).
    pub fn search_prev(&self, key: &[u8]) -> Option<&RegionRecord> {
        if key.is_empty() {
            let (_, id) = self.by_start.iter().next_back()?;
            let rec = self.regions.get(id)?;
            return rec
                .region
                .as_ref()
                .filter(|r| r.end_key.is_empty())
                .map(|_| rec);
        }
        let (_, id) = self.by_start.range(..key.to_vec()).next_back()?;
        let rec = self.regions.get(id)?;
        rec.region
            .as_ref()
            .filter(|r| r.end_key == key)
            .map(|_| rec)
    }

    /// Regions overlapping `[start, end)` in key order, at most `limit` (0 = all).
    pub fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Vec<&RegionRecord> {
        let first = self
            .by_start
            .range(..=start.to_vec())
            .next_back()
            .map(|(k, _)| k.clone())
            .unwrap_or_default();
        let mut out = vec![];
        for (_, id) in self.by_start.range(first..) {
            let Some(rec) = self.regions.get(id) else {
                continue;
            };
            let Some(r) = rec.region.as_ref() else {
                continue;
            };
            if !end.is_empty() && r.start_key.as_slice() >= end {
                break;
            }
            if !r.end_key.is_empty() && r.end_key.as_slice() <= start {
                continue;
            }
            out.push(rec);
            if limit > 0 && out.len() >= limit {
                break;
            }
        }
        out
    }

    /// Inserts or updates a region unless it is older than what is known. Regions it now
    /// covers (older versions of the same key space) are removed.
    pub fn update(&mut self, rec: RegionRecord) -> RegionUpdate {
        let mut out = RegionUpdate::default();
        let Some(region) = rec.region.clone() else {
            out.stale = true;
            return out;
        };
        let new_epoch = epoch(&region);
        if let Some(old) = self.regions.get(&region.id) {
            let old_region = old.region.clone().unwrap_or_default();
            let old_epoch = epoch(&old_region);
            if new_epoch.version < old_epoch.version || new_epoch.conf_ver < old_epoch.conf_ver {
                out.stale = true;
                return out;
            }
            out.epoch_changed = new_epoch != old_epoch
                || old_region.start_key != region.start_key
                || old_region.end_key != region.end_key;
            if new_epoch == old_epoch && rec.leader.is_some() && rec.leader_term < old.leader_term {
                // A leader of an older term reporting the same region: it was deposed and does
                // not know it yet. Routing must keep pointing at the newer leader.
                out.stale = true;
                return out;
            }
            out.leader_changed = old.leader.as_ref().map(|p| p.id)
                != rec.leader.as_ref().map(|p| p.id)
                && rec.leader.is_some();
            if !out.epoch_changed && !out.leader_changed {
                if rec.leader_term > old.leader_term && rec.leader.is_some() {
                    // The same leader in a later term (re-elected): remember the term.
                    if let Some(r) = self.regions.get_mut(&region.id) {
                        r.leader_term = rec.leader_term;
                    }
                }
                return out;
            }
            if self.by_start.get(&old_region.start_key) == Some(&region.id) {
                self.by_start.remove(&old_region.start_key);
            }
        } else {
            out.epoch_changed = true;
            out.leader_changed = rec.leader.is_some();
        }
        // Drop regions overlapping the new one whose version is not newer.
        let mut doomed = vec![];
        for other in self.scan(&region.start_key, &region.end_key, 0) {
            let o = other.region.as_ref().expect("indexed regions have a body");
            if o.id == region.id {
                continue;
            }
            if epoch(o).version > new_epoch.version {
                // The new record is the stale one after all.
                out.stale = true;
            } else {
                doomed.push(o.id);
            }
        }
        if out.stale {
            // Restore the old index entry if we removed it.
            if let Some(old) = self.regions.get(&region.id).and_then(|r| r.region.clone()) {
                self.by_start.insert(old.start_key, old.id);
            }
            out.epoch_changed = false;
            out.leader_changed = false;
            return out;
        }
        for id in doomed {
            self.remove(id);
            out.removed.push(id);
        }
        let mut rec = rec;
        if rec.leader.is_none() {
            rec.leader = self.regions.get(&region.id).and_then(|o| o.leader);
        }
        self.insert(rec);
        out
    }

    pub fn remove(&mut self, id: u64) {
        if let Some(o) = self.regions.remove(&id) {
            self.account(&o, false);
            let s = o.region.map(|r| r.start_key).unwrap_or_default();
            if self.by_start.get(&s) == Some(&id) {
                self.by_start.remove(&s);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.regions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }
}

/// The decoded state machine.
#[derive(Default)]
pub struct MetaState {
    pub cluster_id: u64,
    pub bootstrapped: bool,
    pub id_hwm: u64,
    pub tso_window_end_ms: i64,
    pub gc_safe_point: u64,
    pub stores: HashMap<u64, metapb::Store>,
    pub regions: RegionTree,
    pub members: HashMap<u64, pdpb::Member>,
    pub applied_index: u64,
    pub applied_term: u64,
    raw: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MetaState {
    fn apply_put(&mut self, key: &[u8], value: &[u8]) {
        match key {
            KEY_CLUSTER_ID => self.cluster_id = read_u64(value),
            KEY_BOOTSTRAPPED => self.bootstrapped = value == b"1",
            KEY_ID_HWM => self.id_hwm = self.id_hwm.max(read_u64(value)),
            KEY_TSO => self.tso_window_end_ms = self.tso_window_end_ms.max(read_u64(value) as i64),
            KEY_GC => self.gc_safe_point = self.gc_safe_point.max(read_u64(value)),
            k if k.starts_with(b"s/") => {
                if let Ok(s) = metapb::Store::decode(value) {
                    self.stores.insert(s.id, s);
                }
            }
            k if k.starts_with(b"r/") => {
                if let Ok(r) = RegionRecord::decode(value) {
                    self.regions.update(r);
                }
            }
            k if k.starts_with(b"m/") => {
                if let Ok(m) = pdpb::Member::decode(value) {
                    self.members.insert(m.member_id, m);
                }
            }
            _ => {}
        }
        self.raw.insert(key.to_vec(), value.to_vec());
    }

    fn apply_delete(&mut self, key: &[u8]) {
        if key.starts_with(b"r/") && key.len() == 10 {
            self.regions.remove(read_u64(&key[2..]));
        } else if key.starts_with(b"s/") && key.len() == 10 {
            self.stores.remove(&read_u64(&key[2..]));
        }
        self.raw.remove(key);
    }

    /// Applies one command and stages it in `wb` (with the applied index).
    pub fn apply<W: WriteBatch>(
        &mut self,
        cmd: &PdCommand,
        index: u64,
        term: u64,
        wb: &mut W,
    ) -> atoll_engine::Result<()> {
        for kv in &cmd.puts {
            self.apply_put(&kv.key, &kv.value);
            wb.put_cf(CF_DEFAULT, &kv.key, &kv.value)?;
        }
        for k in &cmd.deletes {
            self.apply_delete(k);
            wb.delete_cf(CF_DEFAULT, k)?;
        }
        self.set_applied(index, term, wb)
    }

    pub fn set_applied<W: WriteBatch>(
        &mut self,
        index: u64,
        term: u64,
        wb: &mut W,
    ) -> atoll_engine::Result<()> {
        self.applied_index = index;
        self.applied_term = term;
        let mut v = index.to_be_bytes().to_vec();
        v.extend_from_slice(&term.to_be_bytes());
        wb.put_cf(CF_RAFT, APPLIED_KEY, &v)
    }

    pub fn dump(&self) -> PdSnapshot {
        PdSnapshot {
            kvs: self
                .raw
                .iter()
                .map(|(k, v)| PdKv {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
        }
    }

    /// Replaces everything with a snapshot's content.
    pub fn restore<E: KvEngine>(
        &mut self,
        snap: &PdSnapshot,
        index: u64,
        term: u64,
        engine: &E,
    ) -> atoll_engine::Result<()> {
        let mut wb = engine.write_batch();
        for k in self.raw.keys() {
            wb.delete_cf(CF_DEFAULT, k)?;
        }
        *self = MetaState::default();
        for kv in &snap.kvs {
            self.apply_put(&kv.key, &kv.value);
            wb.put_cf(CF_DEFAULT, &kv.key, &kv.value)?;
        }
        self.set_applied(index, term, &mut wb)?;
        engine.write(wb, true)
    }

    /// Loads the persisted state machine.
    pub fn load<E: KvEngine>(engine: &E) -> atoll_engine::Result<Self> {
        let mut s = MetaState::default();
        let mut kvs = vec![];
        engine.scan_cf(CF_DEFAULT, b"", None, false, |k, v| {
            kvs.push((k.to_vec(), v.to_vec()));
            Ok(true)
        })?;
        for (k, v) in kvs {
            s.apply_put(&k, &v);
        }
        if let Some(v) = engine.get_value_cf(CF_RAFT, APPLIED_KEY)? {
            if v.len() == 16 {
                s.applied_index = read_u64(&v[..8]);
                s.applied_term = read_u64(&v[8..]);
            }
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, s: &[u8], e: &[u8], ver: u64, leader: Option<u64>) -> RegionRecord {
        RegionRecord {
            region: Some(metapb::Region {
                id,
                start_key: s.to_vec(),
                end_key: e.to_vec(),
                region_epoch: Some(metapb::RegionEpoch {
                    conf_ver: 1,
                    version: ver,
                }),
                peers: vec![],
            }),
            leader: leader.map(|id| metapb::Peer {
                id,
                store_id: 1,
                role: 0,
            }),
            leader_term: 0,
        }
    }

    #[test]
    fn a_deposed_leaders_heartbeat_does_not_move_routing_back() {
        let mut t = RegionTree::default();
        let with_term = |leader, term| RegionRecord {
            leader_term: term,
            ..rec(1, b"", b"", 1, Some(leader))
        };
        t.update(with_term(10, 5));
        // The new leader (term 6) reports.
        assert!(t.update(with_term(11, 6)).leader_changed);
        // The old one, cut off and still believing it leads in term 5, reports late.
        let u = t.update(with_term(10, 5));
        assert!(u.stale && !u.leader_changed);
        assert_eq!(t.search(b"a").unwrap().leader.unwrap().id, 11);
        // The new leader keeps reporting; a re-elected leader in a later term moves it.
        assert!(!t.update(with_term(11, 6)).stale);
        assert!(t.update(with_term(10, 7)).leader_changed);
    }

    #[test]
    fn region_tree_updates_and_splits() {
        let mut t = RegionTree::default();
        assert!(t.update(rec(1, b"", b"", 1, Some(10))).epoch_changed);
        assert_eq!(t.search(b"x").unwrap().region.as_ref().unwrap().id, 1);
        // Split: region 1 shrinks to [,m), region 2 is [m,).
        let u = t.update(rec(2, b"m", b"", 2, Some(20)));
        assert_eq!(u.removed, vec![1]);
        assert!(t.search(b"a").is_none());
        t.update(rec(1, b"", b"m", 2, None));
        assert_eq!(t.search(b"a").unwrap().region.as_ref().unwrap().id, 1);
        // The parent was evicted by its right half first: its leader is learnt again from heartbeats.
        assert!(t.search(b"a").unwrap().leader.is_none());
        assert_eq!(t.search(b"z").unwrap().region.as_ref().unwrap().id, 2);
        // A stale report of the old region 1 is refused.
        assert!(t.update(rec(1, b"", b"", 1, Some(10))).stale);
        assert_eq!(t.len(), 2);
        assert_eq!(t.scan(b"", b"", 0).len(), 2);
        assert_eq!(t.scan(b"n", b"", 0).len(), 1);
        assert_eq!(t.search_prev(b"m").unwrap().region.as_ref().unwrap().id, 1);
        assert_eq!(t.search_prev(b"").unwrap().region.as_ref().unwrap().id, 2);
        // Leader change only.
        let u = t.update(rec(2, b"m", b"", 2, Some(21)));
        assert!(u.leader_changed && !u.epoch_changed);
    }

    /// The counts a full scan of the records gives.
    fn recount(t: &RegionTree) -> HashMap<u64, StoreCount> {
        let mut c: HashMap<u64, StoreCount> = HashMap::new();
        for rec in t.iter() {
            let r = rec.region.as_ref().unwrap();
            for p in &r.peers {
                c.entry(p.store_id).or_default().regions += 1;
            }
            if let Some(l) = rec.leader.filter(|l| r.peers.iter().any(|p| p.id == l.id)) {
                c.entry(l.store_id).or_default().leaders += 1;
            }
        }
        c
    }

    #[test]
    fn patrol_visits_every_region_in_slices_and_wraps() {
        let mut t = RegionTree::default();
        let keys: Vec<Vec<u8>> = (0..10u8).map(|i| vec![b'a' + i]).collect();
        for (i, k) in keys.iter().enumerate() {
            let end = keys.get(i + 1).cloned().unwrap_or_default();
            let start = if i == 0 { vec![] } else { k.clone() };
            t.update(rec(i as u64 + 1, &start, &end, 1, None));
        }
        let mut seen = vec![];
        let mut cursor = vec![];
        for round in 0..4 {
            let (slice, next) = t.patrol(&cursor, 3);
            assert!(slice.len() <= 3);
            seen.extend(slice.iter().map(|r| r.region.as_ref().unwrap().id));
            if round == 3 {
                assert!(next.is_empty(), "the last slice wraps");
            }
            cursor = next;
        }
        assert_eq!(seen, (1..=10).collect::<Vec<u64>>());
        // The next slice starts over; a cursor whose region went away starts at the next one.
        assert_eq!(t.patrol(&cursor, 1).0[0].region.as_ref().unwrap().id, 1);
        t.remove(5);
        let (slice, _) = t.patrol(&keys[4], 2);
        let ids: Vec<u64> = slice
            .iter()
            .map(|r| r.region.as_ref().unwrap().id)
            .collect();
        assert_eq!(ids, vec![6, 7]);
    }

    #[test]
    fn store_counts_follow_every_change() {
        // Splits, merges by eviction, peer moves, leader changes, stale and deposed reports and
        // removals, in a seeded random order; after each, the counts kept as records change
        // equal a full recount.
        let mut t = RegionTree::default();
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for step in 0..5_000u64 {
            let id = 1 + next(40);
            let lo = next(26) as u8;
            let hi = lo + 1 + next(4) as u8;
            let stores: Vec<u64> = (0..3).map(|i| 1 + (id + i + next(2)) % 5).collect();
            let peers: Vec<metapb::Peer> = stores
                .iter()
                .enumerate()
                .map(|(i, s)| metapb::Peer {
                    id: id * 100 + i as u64,
                    store_id: *s,
                    role: 0,
                })
                .collect();
            let leader = match next(4) {
                0 => None,
                1 => Some(metapb::Peer {
                    id: 9_999,
                    store_id: 1,
                    role: 0,
                }),
                n => Some(peers[n as usize - 1]),
            };
            if next(20) == 0 {
                t.remove(id);
            } else {
                t.update(RegionRecord {
                    region: Some(metapb::Region {
                        id,
                        start_key: vec![b'a' + lo],
                        end_key: vec![b'a' + hi],
                        region_epoch: Some(metapb::RegionEpoch {
                            conf_ver: 1 + next(3),
                            version: 1 + step / 50 + next(2),
                        }),
                        peers,
                    }),
                    leader,
                    leader_term: next(5),
                });
            }
            let want = recount(&t);
            for s in 1..=5 {
                assert_eq!(
                    t.store_count(s),
                    want.get(&s).copied().unwrap_or_default(),
                    "store {s} after step {step}"
                );
            }
        }
        assert!(!t.is_empty());
    }
}
