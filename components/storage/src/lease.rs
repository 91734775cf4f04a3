//! etcd leases, the owner's side (docs/design/leases.md).
//!
//! A lease is a record in the system key space ([`record_key`]), placed by a hash of its id so
//! that the records spread over several regions; the keys attached to it are listed under
//! [`attachments_range`] (a superset: a key written again without the lease keeps its entry
//! until the lease goes; whoever reads the list checks each key's lease). Records are ordinary
//! MVCC data: granted, checkpointed and deleted through the same commands as any key, split and
//! moved with their regions.
//!
//! The **leader of a record's region owns the lease's timer**. This module keeps those timers
//! for the regions this store leads ([`LeaseTable`]):
//!
//! - The table follows the records through the apply observer (a grant, a checkpoint, the
//!   expiring mark, a delete are seen as they are applied here) on top of one scan of the
//!   region's records when the leadership starts. A new leadership starts every timer from
//!   its own start: `now + TTL`, or `now + remaining` when a checkpoint is recorded. Neither is
//!   earlier than any deadline a predecessor promised (below), so no lease expires early.
//! - **Keep-alive** (`lease_keep_alive`) is answered only by a confirmed leader (leader lease or
//!   ReadIndex): a deposed leader cannot extend a lease its successor does not know of. A
//!   successor is elected only after a quorum stopped hearing the old leader, so it starts
//!   after every keep-alive the old one answered: its `now + TTL` covers them all.
//! - **Checkpoints** bound the reset a failover causes for long TTLs: a lease not kept alive
//!   for `[storage] lease-checkpoint-interval` (60 s) gets its remaining time written into its
//!   record (batched per region), and a successor counts from that. A keep-alive after a checkpoint clears it
//!   (written before the keep-alive is answered), so a successor never counts from a remaining
//!   time older than a keep-alive it did not see.
//! - **Expiry** marks the record `expiring` through a command decided on the owner's own
//!   timer in the same raft term: it commits only under that leadership (or a successor that
//!   applies it, which then refuses keep-alives too). A lease once due is never renewed by
//!   this owner. The etcd layer then deletes the attached keys, their list and the record in
//!   one transaction, at one revision ([`LeaseTable::expiring`] tells it which), at a bounded
//!   rate ([`EXPIRE_PER_TICK`]).

use crate::atomic::AtomicWrite;
use crate::storage::*;
use atoll_engine::KvEngine;
use atoll_proto::kvrpcpb::*;
use atoll_proto::metapb;
use atoll_raftstore::observer::{ApplyObserver, ObservedWrite};
use atoll_txn::{MvccReader, Write, WriteType};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the owner looks at its leadership, due leases and checkpoints.
pub const TICK: Duration = Duration::from_millis(100);
/// Leases marked expiring per tick and store: 1,000 a second, etcd's default revoke rate.
/// An expiry storm is spread out instead of stalling writes.
pub const EXPIRE_PER_TICK: usize = 100;
/// Records checkpointed per region per tick.
const CHECKPOINT_PER_TICK: usize = 1000;
/// Regions of the lease records the etcd layer splits off at start (by the first byte of the
/// record's hash), so that leases are owned by several leaders from the start.
pub const RECORD_SPLITS: u8 = 8;

// ---- layout ----

fn sys(tail: &[u8]) -> Vec<u8> {
    [atoll_keys::SYSTEM_PREFIX, tail].concat()
}

/// Where the lease records begin.
pub fn records_start() -> Vec<u8> {
    sys(b"lr/")
}

/// Where the lease records end.
pub fn records_end() -> Vec<u8> {
    sys(b"lr0")
}

fn bucket(id: i64) -> u8 {
    ((id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// The key of lease `id`'s record.
pub fn record_key(id: i64) -> Vec<u8> {
    let mut k = records_start();
    k.push(bucket(id));
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The lease whose record `key` is.
pub fn lease_of_record_key(key: &[u8]) -> Option<i64> {
    let rest = key.strip_prefix(records_start().as_slice())?;
    if rest.len() != 9 {
        return None;
    }
    Some(i64::from_be_bytes(rest[1..].try_into().ok()?))
}

/// The keys where the record regions are split (see [`RECORD_SPLITS`]).
pub fn record_split_keys() -> Vec<Vec<u8>> {
    let step = 256 / RECORD_SPLITS as u16;
    (1..RECORD_SPLITS as u16)
        .map(|i| {
            let mut k = records_start();
            k.push((i * step) as u8);
            k
        })
        .collect()
}

fn attachments_prefix(id: i64) -> Vec<u8> {
    let mut k = sys(b"la/");
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The entry saying `key` was attached to lease `id`.
pub fn attachment_key(id: i64, key: &[u8]) -> Vec<u8> {
    let mut k = attachments_prefix(id);
    k.extend_from_slice(key);
    k
}

/// The range of lease `id`'s attachment entries.
pub fn attachments_range(id: i64) -> (Vec<u8>, Vec<u8>) {
    let start = attachments_prefix(id);
    let end = prefix_end(&start);
    (start, end)
}

/// The user key an attachment entry of lease `id` names.
pub fn key_of_attachment(id: i64, entry: &[u8]) -> Option<&[u8]> {
    entry
        .strip_prefix(attachments_prefix(id).as_slice())
        .filter(|k| !k.is_empty())
}

/// The first key after every key that starts with `p` (empty: none).
fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut e = p.to_vec();
    while let Some(last) = e.pop() {
        if last < 0xff {
            e.push(last + 1);
            return e;
        }
    }
    vec![]
}

/// A lease's record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseRecord {
    /// The TTL granted, in seconds.
    pub ttl: i64,
    /// A checkpoint: the remaining time when it was written, in ms (0: none).
    pub remaining_ms: i64,
    /// Due: its owner decided it expired; its keys are being deleted.
    pub expiring: bool,
}

const RECORD_V1: u8 = 1;

impl LeaseRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(18);
        v.push(RECORD_V1);
        v.extend_from_slice(&self.ttl.to_be_bytes());
        v.extend_from_slice(&self.remaining_ms.to_be_bytes());
        v.push(u8::from(self.expiring));
        v
    }

    pub fn decode(v: &[u8]) -> Option<LeaseRecord> {
        if v.len() != 18 || v[0] != RECORD_V1 {
            return None;
        }
        Some(LeaseRecord {
            ttl: i64::from_be_bytes(v[1..9].try_into().ok()?),
            remaining_ms: i64::from_be_bytes(v[9..17].try_into().ok()?),
            expiring: v[17] != 0,
        })
    }

    /// How long a new owner gives the lease from its own start.
    fn initial(&self) -> Duration {
        let full = Duration::from_secs(self.ttl.max(0) as u64);
        if self.remaining_ms > 0 {
            full.min(Duration::from_millis(self.remaining_ms as u64))
        } else {
            full
        }
    }
}

// ---- the owner's timers ----

struct Owned {
    term: u64,
    region: metapb::Region,
    /// Leases the observer changed since the load began (`None`: loaded).
    touched: Option<HashSet<i64>>,
}

struct Held {
    region_id: u64,
    ttl: i64,
    deadline: Instant,
    /// The checkpoint in the record (ms; 0: none).
    checkpoint_ms: i64,
    expiring: bool,
    /// A mark or checkpoint command for it is in flight.
    busy: bool,
    /// Attempts to mark it expiring that failed in a row (a lock on the record, say).
    mark_failures: u32,
}

#[derive(Default)]
struct Inner {
    owned: HashMap<u64, Owned>,
    leases: HashMap<i64, Held>,
    due: BTreeSet<(Instant, i64)>,
    /// The leases in `leases` that are expiring.
    expiring: HashSet<i64>,
}

impl Inner {
    fn set_deadline(&mut self, id: i64, deadline: Instant) {
        if let Some(h) = self.leases.get_mut(&id) {
            self.due.remove(&(h.deadline, id));
            h.deadline = deadline;
            self.due.insert((deadline, id));
        }
    }

    fn upsert(&mut self, region_id: u64, id: i64, rec: LeaseRecord, now: Instant) {
        if let Some(h) = self.leases.get_mut(&id) {
            h.region_id = region_id;
            h.ttl = rec.ttl;
            h.checkpoint_ms = rec.remaining_ms;
            h.expiring |= rec.expiring;
            if h.expiring {
                self.expiring.insert(id);
            }
            return;
        }
        if rec.expiring {
            self.expiring.insert(id);
        }
        let deadline = now + rec.initial();
        self.leases.insert(
            id,
            Held {
                region_id,
                ttl: rec.ttl,
                deadline,
                checkpoint_ms: rec.remaining_ms,
                expiring: rec.expiring,
                busy: false,
                mark_failures: 0,
            },
        );
        self.due.insert((deadline, id));
    }

    fn remove(&mut self, id: i64) {
        self.expiring.remove(&id);
        if let Some(h) = self.leases.remove(&id) {
            self.due.remove(&(h.deadline, id));
        }
    }

    fn drop_region(&mut self, region_id: u64) {
        self.owned.remove(&region_id);
        let ids: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, h)| h.region_id == region_id)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.remove(id);
        }
    }

    /// Whether this store owns `id`'s timer under `region_id`'s leadership in `term`, loaded.
    fn owns(&self, region_id: u64, term: u64, id: i64) -> bool {
        self.owned
            .get(&region_id)
            .is_some_and(|o| o.term == term && o.touched.is_none())
            && self
                .leases
                .get(&id)
                .is_some_and(|h| h.region_id == region_id)
    }
}

/// The lease timers of the record regions this store leads. Installed as an apply observer.
#[derive(Default)]
pub struct LeaseTable {
    inner: Mutex<Inner>,
    /// Ids of the regions in `inner.owned` (read on the apply threads).
    observed: RwLock<HashSet<u64>>,
    /// Woken when a lease turns expiring here.
    expiring: tokio::sync::Notify,
}

impl LeaseTable {
    /// Leases of this store's regions marked expiring (their keys still to delete): what the
    /// etcd layer revokes. Waits until there is one or `wait` passed.
    pub async fn expiring(&self, wait: Duration) -> Vec<i64> {
        let notified = self.expiring.notified();
        let now = self.expiring_now();
        if !now.is_empty() {
            return now;
        }
        let _ = tokio::time::timeout(wait, notified).await;
        self.expiring_now()
    }

    fn expiring_now(&self) -> Vec<i64> {
        self.inner.lock().expiring.iter().copied().collect()
    }

    /// How many leases this store's timers hold.
    pub fn len(&self) -> usize {
        self.inner.lock().leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ApplyObserver for LeaseTable {
    fn observes(&self, region_id: u64) -> bool {
        self.observed.read().contains(&region_id)
    }

    fn before_write(&self, _writes: &[ObservedWrite]) {}

    fn after_write(&self, writes: &[ObservedWrite]) {
        let start = records_start();
        let end = records_end();
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let mut turned_expiring = false;
        for w in writes {
            if !inner.owned.contains_key(&w.region_id) {
                continue;
            }
            let Ok((key, _)) = atoll_txn::reader::decode_write_key(&w.key) else {
                continue;
            };
            if key < start || key >= end {
                continue;
            }
            let (Some(id), Ok(write)) = (lease_of_record_key(&key), Write::decode(&w.value)) else {
                continue;
            };
            match write.write_type {
                WriteType::Put => {
                    let Some(rec) = write.short_value.as_deref().and_then(LeaseRecord::decode)
                    else {
                        continue;
                    };
                    turned_expiring |= rec.expiring;
                    inner.upsert(w.region_id, id, rec, now);
                }
                WriteType::Delete => inner.remove(id),
                _ => continue,
            }
            if let Some(t) = inner
                .owned
                .get_mut(&w.region_id)
                .and_then(|o| o.touched.as_mut())
            {
                t.insert(id);
            }
        }
        drop(inner);
        if turned_expiring {
            self.expiring.notify_waiters();
        }
    }

    fn reset(&self, region_id: u64) {
        let mut inner = self.inner.lock();
        if inner.owned.contains_key(&region_id) {
            inner.drop_region(region_id);
            self.observed.write().remove(&region_id);
        }
    }
}

/// Sends every observed write to each of several observers.
pub struct Fanout(pub Vec<Arc<dyn ApplyObserver>>);

impl ApplyObserver for Fanout {
    fn observes(&self, region_id: u64) -> bool {
        self.0.iter().any(|o| o.observes(region_id))
    }
    fn before_write(&self, writes: &[ObservedWrite]) {
        for o in &self.0 {
            o.before_write(writes);
        }
    }
    fn after_write(&self, writes: &[ObservedWrite]) {
        for o in &self.0 {
            o.after_write(writes);
        }
    }
    fn reset(&self, region_id: u64) {
        for o in &self.0 {
            o.reset(region_id);
        }
    }
}

fn busy(msg: String) -> Fail {
    Fail::region(atoll_raftstore::Error::ServerIsBusy(msg))
}

fn leader_ctx(region: &metapb::Region, store_id: u64) -> Context {
    Context {
        region_id: region.id,
        region_epoch: region.region_epoch,
        peer: region
            .peers
            .iter()
            .find(|p| p.store_id == store_id)
            .copied(),
        ..Default::default()
    }
}

impl<E: KvEngine> Storage<E> {
    /// The owner's loop: follows leadership of the record regions, marks due leases expiring,
    /// writes checkpoints. One task per store, whatever the number of regions or leases.
    pub async fn run_lease_timers(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut t = tokio::time::interval(TICK);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_checkpoint = Instant::now();
        loop {
            tokio::select! {
                _ = t.tick() => {}
                _ = stop.changed() => return,
            }
            self.sync_lease_regions();
            self.expire_due();
            if last_checkpoint.elapsed() >= Duration::from_secs(1) {
                last_checkpoint = Instant::now();
                self.checkpoint_leases();
            }
        }
    }

    /// Starts loading the record regions this store began to lead; forgets those it stopped
    /// leading and the leases a split moved out of a region.
    fn sync_lease_regions(self: &Arc<Self>) {
        let leaders = self
            .router
            .leaders_overlapping(&records_start(), &records_end());
        let table = &self.leases;
        let mut inner = table.inner.lock();
        let mut now_led = HashSet::new();
        for (region, term) in leaders {
            now_led.insert(region.id);
            match inner.owned.get_mut(&region.id) {
                Some(o) if o.term == term => {
                    if o.region.region_epoch != region.region_epoch {
                        // A split or merge: keep only the leases still in the region.
                        let (s, e) = (region.start_key.clone(), region.end_key.clone());
                        o.region = region;
                        let id = o.region.id;
                        let gone: Vec<i64> = inner
                            .leases
                            .iter()
                            .filter(|(l, h)| {
                                h.region_id == id && !atoll_keys::in_range(&record_key(**l), &s, &e)
                            })
                            .map(|(l, _)| *l)
                            .collect();
                        for l in gone {
                            inner.remove(l);
                        }
                    }
                }
                _ => {
                    inner.drop_region(region.id);
                    inner.owned.insert(
                        region.id,
                        Owned {
                            term,
                            region: region.clone(),
                            touched: Some(HashSet::new()),
                        },
                    );
                    table.observed.write().insert(region.id);
                    let s = self.clone();
                    tokio::spawn(async move { s.load_leases(region, term).await });
                }
            }
        }
        let lost: Vec<u64> = inner
            .owned
            .keys()
            .filter(|id| !now_led.contains(id))
            .copied()
            .collect();
        for id in lost {
            inner.drop_region(id);
            table.observed.write().remove(&id);
        }
    }

    /// Reads a newly led region's records and starts their timers (what the observer saw
    /// meanwhile wins: it is newer).
    async fn load_leases(self: Arc<Self>, region: metapb::Region, term: u64) {
        let ctx = leader_ctx(&region, self.router.store_id().get());
        let loaded: Result<Vec<(i64, LeaseRecord)>, Fail> = async {
            let snap = self.confirmed_snapshot(&ctx).await?;
            if snap.term != term {
                return Err(busy(format!("region {} changed term", region.id)));
            }
            let r = &snap.region;
            let start = records_start().max(r.start_key.clone());
            let end = if r.end_key.is_empty() {
                records_end()
            } else {
                records_end().min(r.end_key.clone())
            };
            let reader = MvccReader::new(snap.snap.clone());
            Ok(reader
                .scan_latest_committed(&start, &end)?
                .into_iter()
                .filter_map(|(k, v)| Some((lease_of_record_key(&k)?, LeaseRecord::decode(&v)?)))
                .collect())
        }
        .await;
        let table = &self.leases;
        let mut inner = table.inner.lock();
        let still = inner
            .owned
            .get(&region.id)
            .is_some_and(|o| o.term == term && o.touched.is_some());
        if !still {
            return;
        }
        match loaded {
            Ok(records) => {
                let touched = inner
                    .owned
                    .get_mut(&region.id)
                    .and_then(|o| o.touched.take())
                    .unwrap_or_default();
                let now = Instant::now();
                let mut any_expiring = false;
                for (id, rec) in records {
                    if !touched.contains(&id) {
                        any_expiring |= rec.expiring;
                        inner.upsert(region.id, id, rec, now);
                    }
                }
                tracing::debug!(
                    region_id = region.id,
                    term,
                    leases = inner.leases.len(),
                    "lease timers loaded"
                );
                drop(inner);
                if any_expiring {
                    table.expiring.notify_waiters();
                }
            }
            Err(_) => {
                // Try again at the next tick.
                inner.drop_region(region.id);
                table.observed.write().remove(&region.id);
            }
        }
    }

    /// Marks the leases whose deadline passed expiring, at most [`EXPIRE_PER_TICK`] a tick,
    /// one command per region.
    fn expire_due(self: &Arc<Self>) {
        let now = Instant::now();
        let mut by_region: HashMap<u64, Vec<i64>> = HashMap::new();
        {
            let mut inner = self.leases.inner.lock();
            let mut picked = 0;
            let due: Vec<i64> = inner
                .due
                .iter()
                .take_while(|(d, _)| *d <= now)
                .map(|(_, id)| *id)
                .collect();
            for id in due {
                if picked >= EXPIRE_PER_TICK {
                    break;
                }
                let Some(h) = inner.leases.get_mut(&id) else {
                    continue;
                };
                if h.expiring || h.busy {
                    continue;
                }
                h.busy = true;
                picked += 1;
                by_region.entry(h.region_id).or_default().push(id);
            }
        }
        for (region_id, ids) in by_region {
            let s = self.clone();
            tokio::spawn(async move {
                let r = s
                    .rewrite_records(region_id, &ids, |rec, h, now| {
                        (h.deadline <= now && !rec.expiring).then_some(LeaseRecord {
                            expiring: true,
                            ..rec
                        })
                    })
                    .await;
                if let Err(e) = &r {
                    tracing::debug!(region_id, error = ?e, "marking leases expiring failed; retried");
                }
                s.leases.set_idle(&ids);
                s.leases.count_mark(&ids, r.is_ok());
            });
        }
    }

    /// Writes the remaining time of leases not kept alive for a while into their records.
    fn checkpoint_leases(self: &Arc<Self>) {
        let now = Instant::now();
        let interval_ms = self.cfg.lease_checkpoint_interval.0.as_millis() as i64;
        let mut by_region: HashMap<u64, Vec<i64>> = HashMap::new();
        {
            let mut inner = self.leases.inner.lock();
            for (id, h) in inner.leases.iter_mut() {
                if h.expiring || h.busy || h.ttl * 1000 <= interval_ms {
                    continue;
                }
                let remaining = h.deadline.saturating_duration_since(now).as_millis() as i64;
                let idle = h.ttl * 1000 - remaining;
                let stale = h.checkpoint_ms == 0 || h.checkpoint_ms - remaining >= interval_ms;
                if idle >= interval_ms && stale && remaining > 0 {
                    let v = by_region.entry(h.region_id).or_default();
                    if v.len() < CHECKPOINT_PER_TICK {
                        h.busy = true;
                        v.push(*id);
                    }
                }
            }
        }
        for (region_id, ids) in by_region {
            let s = self.clone();
            tokio::spawn(async move {
                let _ = s
                    .rewrite_records(region_id, &ids, |rec, h, now| {
                        let remaining = h.deadline.saturating_duration_since(now).as_millis();
                        (!rec.expiring && remaining > 0).then_some(LeaseRecord {
                            remaining_ms: remaining as i64,
                            ..rec
                        })
                    })
                    .await;
                s.leases.set_idle(&ids);
            });
        }
    }

    /// Rewrites the records of `ids` in region `region_id` as `change` says, in one command
    /// decided on this store's timers in the leadership the timers belong to: nothing is
    /// written unless the deciding snapshot's term is the timers' term.
    async fn rewrite_records(
        &self,
        region_id: u64,
        ids: &[i64],
        change: impl Fn(LeaseRecord, &HeldView, Instant) -> Option<LeaseRecord>,
    ) -> Result<usize, Fail> {
        let (region, term) = {
            let inner = self.leases.inner.lock();
            let Some(o) = inner.owned.get(&region_id) else {
                return Ok(0);
            };
            (o.region.clone(), o.term)
        };
        let ctx = leader_ctx(&region, self.router.store_id().get());
        let keys: Vec<Vec<u8>> = ids.iter().map(|id| record_key(*id)).collect();
        let start_ts = self.fresh_pair().await? - 1;
        let table = &self.leases;
        let done = self
            .atomic(&ctx, start_ts, &keys, &[], |view| {
                let mut writes = vec![];
                if view.term != term {
                    return Ok((writes, ()));
                }
                let inner = table.inner.lock();
                let now = Instant::now();
                for (id, key) in ids.iter().zip(&keys) {
                    if !inner.owns(region_id, term, *id) {
                        continue;
                    }
                    let Some(h) = inner.leases.get(id) else {
                        continue;
                    };
                    let held = HeldView {
                        deadline: h.deadline,
                    };
                    let Some(v) = view.reader.get(key, view.ts, view.bypass_locks)? else {
                        continue;
                    };
                    let Some(rec) = LeaseRecord::decode(&v) else {
                        continue;
                    };
                    if let Some(new) = change(rec, &held, now) {
                        writes.push(AtomicWrite {
                            key: key.clone(),
                            value: Some(new.encode()),
                            lease: 0,
                        });
                    }
                }
                Ok((writes, ()))
            })
            .await?;
        Ok(usize::from(done.wrote))
    }

    /// Keep-alive of leases whose records lie in the region of the request: each gets its
    /// full TTL again from now, answered by a confirmed leader whose timers are loaded.
    pub async fn lease_keep_alive(
        &self,
        req: LeaseKeepAliveRequest,
    ) -> RespResult<LeaseKeepAliveResponse> {
        let ctx = self.check_ctx(&req.context)?;
        let mut resp = LeaseKeepAliveResponse::default();
        match self.keep_alive(&ctx, &req.ids).await {
            Ok(ttls) => resp.ttls = ttls,
            Err(f) => fail_into!(resp, f, key),
        }
        Ok(resp)
    }

    async fn keep_alive(&self, ctx: &Context, ids: &[i64]) -> Result<Vec<i64>, Fail> {
        let snap = self.confirmed_snapshot(ctx).await?;
        let keys: Vec<Vec<u8>> = ids.iter().map(|id| record_key(*id)).collect();
        let krefs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        check_in_region(&krefs, &snap.region)?;
        let region_id = snap.region.id;
        // Leases whose record holds a checkpoint: cleared before they are renewed.
        let mut clear = vec![];
        {
            let inner = self.leases.inner.lock();
            self.check_owner(&inner, region_id, snap.term)?;
            for id in ids {
                if let Some(h) = inner.leases.get(id) {
                    if h.checkpoint_ms != 0 && !h.expiring {
                        clear.push(*id);
                    }
                }
            }
        }
        if !clear.is_empty() {
            self.rewrite_records(region_id, &clear, |rec, _, _| {
                (rec.remaining_ms != 0 && !rec.expiring).then_some(LeaseRecord {
                    remaining_ms: 0,
                    ..rec
                })
            })
            .await?;
        }
        let now = Instant::now();
        let mut inner = self.leases.inner.lock();
        self.check_owner(&inner, region_id, snap.term)?;
        let mut ttls = Vec::with_capacity(ids.len());
        for id in ids {
            let ttl = match inner.leases.get(id) {
                None => 0,
                Some(h) if h.expiring || h.deadline <= now => 0,
                Some(h) if h.busy || h.checkpoint_ms != 0 => {
                    // A checkpoint or the expiring mark is being written (decided on the
                    // deadline as it is now), or a checkpoint is still recorded: renewing now
                    // could promise more than a successor would grant. Retried by the client.
                    return Err(busy(format!("lease {id:x}: record being rewritten")));
                }
                Some(h) => h.ttl,
            };
            if ttl > 0 {
                inner.set_deadline(*id, now + Duration::from_secs(ttl as u64));
            }
            ttls.push(ttl);
        }
        Ok(ttls)
    }

    fn check_owner(&self, inner: &Inner, region_id: u64, term: u64) -> Result<(), Fail> {
        match inner.owned.get(&region_id) {
            Some(o) if o.term == term && o.touched.is_none() => Ok(()),
            _ => Err(busy(format!(
                "region {region_id}: lease timers of this leadership not loaded yet"
            ))),
        }
    }

    /// The granted TTL and remaining time of a lease, from its owner.
    pub async fn lease_time_to_live(
        &self,
        req: LeaseTimeToLiveRequest,
    ) -> RespResult<LeaseTimeToLiveResponse> {
        let ctx = self.check_ctx(&req.context)?;
        let mut resp = LeaseTimeToLiveResponse::default();
        let r: Result<(), Fail> = async {
            let snap = self.confirmed_snapshot(&ctx).await?;
            let key = record_key(req.id);
            check_in_region(&[key.as_slice()], &snap.region)?;
            let inner = self.leases.inner.lock();
            self.check_owner(&inner, snap.region.id, snap.term)?;
            if let Some(h) = inner.leases.get(&req.id) {
                if !h.expiring {
                    resp.found = true;
                    resp.granted_ttl = h.ttl;
                    resp.remaining_ms = h
                        .deadline
                        .saturating_duration_since(Instant::now())
                        .as_millis() as i64;
                }
            }
            Ok(())
        }
        .await;
        if let Err(f) = r {
            fail_into!(resp, f, key);
        }
        Ok(resp)
    }
}

/// What a record rewrite may look at of a lease's timer.
pub struct HeldView {
    pub deadline: Instant,
}

impl LeaseTable {
    fn count_mark(&self, ids: &[i64], ok: bool) {
        let mut inner = self.inner.lock();
        for id in ids {
            if let Some(h) = inner.leases.get_mut(id) {
                h.mark_failures = if ok { 0 } else { h.mark_failures + 1 };
            }
        }
    }

    /// Due leases that could not be marked expiring several times in a row: most likely a
    /// transaction left a lock on the record. Whoever reads the record through the client
    /// resolves it (the etcd layer does, for these).
    pub fn stuck(&self) -> Vec<i64> {
        let inner = self.inner.lock();
        let now = Instant::now();
        inner
            .due
            .iter()
            .take_while(|(d, _)| *d <= now)
            .filter(|(_, id)| {
                inner
                    .leases
                    .get(id)
                    .is_some_and(|h| !h.expiring && h.mark_failures >= 3)
            })
            .map(|(_, id)| *id)
            .take(64)
            .collect()
    }

    fn set_idle(&self, ids: &[i64]) {
        let mut inner = self.inner.lock();
        for id in ids {
            if let Some(h) = inner.leases.get_mut(id) {
                h.busy = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_keeps_records_and_attachments_apart() {
        let r = record_key(0x1234);
        assert!(r.starts_with(&records_start()) && r < records_end());
        assert_eq!(lease_of_record_key(&r), Some(0x1234));
        assert_eq!(lease_of_record_key(&record_key(-5)), Some(-5));
        assert!(atoll_keys::is_system_key(&r));
        let (s, e) = attachments_range(7);
        let a = attachment_key(7, b"k");
        assert!(a >= s && a < e);
        assert!(!(records_start()..records_end()).contains(&a));
        assert_eq!(key_of_attachment(7, &a), Some(&b"k"[..]));
        assert_eq!(key_of_attachment(8, &a), None);
        // Ids whose bytes end in 0xff still get a proper range.
        let (s, e) = attachments_range(-1);
        assert!(s < e && attachment_key(-1, b"\xff\xff") < e);
        let splits = record_split_keys();
        assert_eq!(splits.len(), RECORD_SPLITS as usize - 1);
        assert!(splits.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn records_round_trip_and_checkpoints_bound_the_restart() {
        let rec = LeaseRecord {
            ttl: 600,
            remaining_ms: 12_000,
            expiring: false,
        };
        assert_eq!(LeaseRecord::decode(&rec.encode()), Some(rec));
        assert_eq!(rec.initial(), Duration::from_secs(12));
        let full = LeaseRecord {
            remaining_ms: 0,
            ..rec
        };
        assert_eq!(full.initial(), Duration::from_secs(600));
        assert_eq!(LeaseRecord::decode(b"junk"), None);
    }
}
