//! The leader's side of the change feed (etcd's Watch; `docs/design/watch.md`): which changes
//! a range had since a version, and up to which version that answer is complete.
//!
//! # Resolved versions
//!
//! [`Storage::kv_changes`] takes a fresh PD timestamp `T` and reads the region as a
//! linearizable read at `T` would: `max_ts` is raised to `T` (a one-phase commit chosen from
//! now on lands above it), one-phase writes in flight at or below it are waited out, and the
//! snapshot is confirmed by ReadIndex or the leader lease. Every commit at or below `T` is then
//! applied, except those of transactions whose locks are in the snapshot: a lock bounds the
//! answer at its start timestamp (or just below its `min_commit_ts`). So every change at or
//! below the resolved version is known, and none can appear later: the guarantee a watch's
//! ordering and gaplessness rest on.
//!
//! # Where the changes come from
//!
//! A region that is asked about keeps a [`ChangeLog`] ring of the `(commit_ts, key)` of every
//! data change its apply writes (the raftstore's [`ApplyObserver`] hook, pushed *before* the
//! batch is written, completed after). A ring created at some moment learns a fresh PD
//! timestamp `Tc` afterwards: every commit timestamp is one PD handed out before the commit
//! was chosen (see `Storage::one_pc_commit_ts`), so a commit above `Tc` was applied after the
//! ring existed and is in it. An answer from `from` is served from the ring when the ring
//! covers it (`Tc`, and the largest timestamp it evicted, are at or below `from`); otherwise
//! (a new leader, an old version, a long pause) from an MVCC scan of the write column family:
//! the catch-up. Below the GC safe point history is gone: the answer says `compacted_version`.

use crate::storage::*;
use atoll_engine::{KvEngine, Snapshot};
use atoll_proto::kvrpcpb::*;
use atoll_proto::mvccpb::{event::EventType, Event, KeyValue};
use atoll_raftstore::observer::{ApplyObserver, ObservedWrite};
use atoll_raftstore::RegionId;
use atoll_txn::reader::decode_write_key;
use atoll_txn::{MvccReader, Write, WriteType};
use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tonic::Status;

/// Bytes of `(commit_ts, key)` a region's ring keeps before evicting its oldest.
const RING_BYTES: usize = 8 << 20;
/// A ring nobody asked about for this long is dropped.
const RING_IDLE: Duration = Duration::from_secs(300);
/// Default and largest answer size.
const MAX_ANSWER_BYTES: u64 = 4 << 20;
/// The longest long poll.
const MAX_WAIT: Duration = Duration::from_secs(10);

struct Ring {
    /// `(commit_ts, user key)` in apply order.
    changes: VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
    /// Every commit above this applied on this store is in `changes`: the fresh timestamp
    /// learned after creation, raised by evictions. `None` until learned.
    covered_from: Option<u64>,
    /// The largest commit timestamp evicted so far.
    evicted: u64,
    /// Batches handed over (before their write) and batches written.
    pushed: u64,
    done: u64,
    last_used: Instant,
    notify: Arc<Notify>,
}

impl Ring {
    fn new() -> Ring {
        Ring {
            changes: VecDeque::new(),
            bytes: 0,
            covered_from: None,
            evicted: 0,
            pushed: 0,
            done: 0,
            last_used: Instant::now(),
            notify: Arc::new(Notify::new()),
        }
    }

    fn covers(&self, from: u64) -> bool {
        self.covered_from.is_some_and(|c| c <= from)
    }

    fn has_change_above(&self, from: u64, start: &[u8], end: &[u8]) -> bool {
        self.changes
            .iter()
            .rev()
            .any(|(ts, k)| *ts > from && atoll_keys::in_range(k, start, end))
    }
}

/// The rings of the regions whose changes are asked about (see the module doc).
#[derive(Default)]
pub struct ChangeLog {
    rings: RwLock<HashMap<u64, Arc<Mutex<Ring>>>>,
    last_sweep: Mutex<Option<Instant>>,
}

impl ChangeLog {
    /// The ring of `region_id`, created if missing (`true` when created).
    fn ring(&self, region_id: u64) -> (Arc<Mutex<Ring>>, bool) {
        self.sweep();
        if let Some(r) = self.rings.read().get(&region_id) {
            r.lock().last_used = Instant::now();
            return (r.clone(), false);
        }
        let mut rings = self.rings.write();
        if let Some(r) = rings.get(&region_id) {
            return (r.clone(), false);
        }
        let r = Arc::new(Mutex::new(Ring::new()));
        rings.insert(region_id, r.clone());
        (r, true)
    }

    /// Whether `ring` is still the ring of `region_id` (not reset since it was taken).
    fn is_current(&self, region_id: u64, ring: &Arc<Mutex<Ring>>) -> bool {
        self.rings
            .read()
            .get(&region_id)
            .is_some_and(|r| Arc::ptr_eq(r, ring))
    }

    fn sweep(&self) {
        let mut last = self.last_sweep.lock();
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(30)) {
            return;
        }
        *last = Some(Instant::now());
        self.rings
            .write()
            .retain(|_, r| r.lock().last_used.elapsed() < RING_IDLE);
    }

    /// Regions with a ring (metrics, tests).
    pub fn observed_regions(&self) -> usize {
        self.rings.read().len()
    }

    fn for_each_touched(&self, writes: &[ObservedWrite], mut f: impl FnMut(&mut Ring)) {
        let rings = self.rings.read();
        let mut last = 0;
        for w in writes {
            if w.region_id == last {
                continue;
            }
            last = w.region_id;
            if let Some(r) = rings.get(&w.region_id) {
                f(&mut r.lock());
            }
        }
    }
}

impl ApplyObserver for ChangeLog {
    fn observes(&self, region_id: u64) -> bool {
        self.rings.read().contains_key(&region_id)
    }

    fn before_write(&self, writes: &[ObservedWrite]) {
        let rings = self.rings.read();
        let mut touched: Vec<u64> = Vec::new();
        for w in writes {
            let Some(ring) = rings.get(&w.region_id) else {
                continue;
            };
            let Ok(record) = Write::decode(&w.value) else {
                continue;
            };
            if !record.is_data_change() {
                continue;
            }
            let Ok((key, ts)) = decode_write_key(&w.key) else {
                continue;
            };
            let mut r = ring.lock();
            r.bytes += key.len() + 32;
            r.changes.push_back((ts, key));
            while r.bytes > RING_BYTES {
                let Some((ts, k)) = r.changes.pop_front() else {
                    break;
                };
                r.bytes -= k.len() + 32;
                r.evicted = r.evicted.max(ts);
                if let Some(c) = r.covered_from.as_mut() {
                    *c = (*c).max(ts);
                }
            }
            if !touched.contains(&w.region_id) {
                touched.push(w.region_id);
                r.pushed += 1;
            }
        }
    }

    fn after_write(&self, writes: &[ObservedWrite]) {
        self.for_each_touched(writes, |r| {
            if r.done != r.pushed {
                r.done = r.pushed;
                r.notify.notify_waiters();
            }
        });
    }

    fn reset(&self, region_id: u64) {
        if let Some(r) = self.rings.write().remove(&region_id) {
            r.lock().notify.notify_waiters();
        }
    }
}

/// A change as etcd's event, read from `reader` (`prev`: with the version before it).
fn event_of<S: Snapshot>(
    reader: &MvccReader<S>,
    key: Vec<u8>,
    ts: u64,
    write: &Write,
    prev: bool,
) -> Result<Event, Fail> {
    let kv = if write.write_type == WriteType::Put {
        let value = reader.load_data(&key, write)?;
        crate::etcd::key_value(key.clone(), value, &write.meta(ts))
    } else {
        KeyValue {
            key: key.clone(),
            mod_revision: ts as i64,
            ..Default::default()
        }
    };
    let prev_kv = if prev {
        match reader.latest_data_write(&key, ts - 1)? {
            Some((pts, w)) if w.write_type == WriteType::Put => {
                let value = reader.load_data(&key, &w)?;
                Some(crate::etcd::key_value(key, value, &w.meta(pts)))
            }
            _ => None,
        }
    } else {
        None
    };
    Ok(Event {
        r#type: if write.write_type == WriteType::Put {
            EventType::Put as i32
        } else {
            EventType::Delete as i32
        },
        kv: Some(kv),
        prev_kv,
    })
}

fn event_bytes(e: &Event) -> u64 {
    let kv = |k: &Option<KeyValue>| k.as_ref().map_or(0, |k| k.key.len() + k.value.len() + 40);
    (kv(&e.kv) + kv(&e.prev_kv)) as u64
}

impl<E: KvEngine> Storage<E> {
    /// The changes of a range in one region since a version (see the module doc).
    pub async fn kv_changes(&self, req: ChangesRequest) -> RespResult<ChangesResponse> {
        let ctx = self.check_ctx(&req.context)?;
        if !req.end_key.is_empty() && req.end_key <= req.start_key {
            return Err(Status::invalid_argument(
                "changes: end_key must be above start_key",
            ));
        }
        let mut resp = ChangesResponse {
            resolved_version: req.from_version,
            ..Default::default()
        };
        if let Err(f) = self.changes_into(&ctx, &req, &mut resp).await {
            resp.events.clear();
            resp.resolved_version = req.from_version;
            fail_into!(resp, f, key);
        }
        Ok(resp)
    }

    async fn changes_into(
        &self,
        ctx: &atoll_proto::kvrpcpb::Context,
        req: &ChangesRequest,
        resp: &mut ChangesResponse,
    ) -> Result<(), Fail> {
        self.check_store(ctx)?;
        let region_id = ctx.region_id;
        let from = req.from_version;
        let safe_point = self.safe_point.load(Ordering::Relaxed);
        if from.saturating_add(1) < safe_point {
            resp.compacted_version = safe_point;
            return Ok(());
        }
        if !self.router.is_leader(RegionId(region_id)) {
            return Err(Fail::region(atoll_raftstore::Error::NotLeader {
                region_id,
                leader: self.router.leader_of(RegionId(region_id)),
            }));
        }
        let (ring, created) = self.changes.ring(region_id);
        if created || ring.lock().covered_from.is_none() {
            // Learned after the ring exists: every commit above it is applied after, so seen.
            let tc = self.fresh_ts().await?;
            let mut r = ring.lock();
            if r.covered_from.is_none() {
                r.covered_from = Some(tc.max(r.evicted));
            }
        }
        // The long poll: until a change above `from` in the range is applied here.
        let wait = Duration::from_millis(u64::from(req.wait_ms)).min(MAX_WAIT);
        if !wait.is_zero() {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let notify = {
                    let r = ring.lock();
                    if !r.covers(from) || r.has_change_above(from, &req.start_key, &req.end_key) {
                        break;
                    }
                    r.notify.clone()
                };
                let notified = notify.notified();
                if !self.changes.is_current(region_id, &ring) {
                    break;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    break;
                }
            }
        }
        let _permit = self.admit().ok_or_else(|| {
            Fail::region(atoll_raftstore::Error::ServerIsBusy(
                "too many requests in flight".into(),
            ))
        })?;
        // The barrier: a linearizable read of the range at a fresh timestamp.
        let ts = self.fresh_ts().await?;
        let snap = self
            .read_snapshot(ctx, ts, None, Some((&req.start_key, &req.end_key)))
            .await?;
        let region = snap.region.clone();
        resp.region_end_key = region.end_key.clone();
        if !atoll_keys::in_range(&req.start_key, &region.start_key, &region.end_key) {
            return Err(key_not_in_region(&req.start_key, &region));
        }
        let start = req.start_key.clone();
        let end = match (req.end_key.is_empty(), region.end_key.is_empty()) {
            (true, _) => region.end_key.clone(),
            (false, true) => req.end_key.clone(),
            (false, false) => req.end_key.clone().min(region.end_key.clone()),
        };
        let reader = MvccReader::new(snap.snap);
        let mut resolved = ts;
        let mut oldest_lock = None;
        for (key, lock) in reader.scan_locks(&start, &end, ts, 0)? {
            // The transaction cannot commit below this (its primary may have been pushed by
            // the caller as a reader would: the secondary's own record is not).
            let min_commit = lock
                .min_commit_ts
                .max(req.pushed.get(&lock.start_ts).map_or(0, |p| p + 1));
            if min_commit > ts {
                continue; // cannot commit at or below ts
            }
            let bound = lock.start_ts.max(min_commit.saturating_sub(1));
            if bound < resolved {
                resolved = bound;
                oldest_lock = Some(lock.into_lock_info(key));
            }
        }
        if let Some(info) = oldest_lock {
            // Not an error: the answer is complete up to `resolved`. The lock is named so
            // the caller can resolve it as a reader at `ts` would (an abandoned lock would
            // otherwise hold the feed back until its TTL ran out and someone resolved it).
            resp.error = Some(KeyError {
                locked: Some(info),
                ..Default::default()
            });
        }
        if resolved <= from {
            return Ok(());
        }
        // The changes in (from, resolved], from the ring when it covers `from`.
        let from_ring = {
            let r = ring.lock();
            r.covers(from) && self.changes.is_current(region_id, &ring)
        };
        let mut changes: Vec<(u64, Vec<u8>, Option<Write>)> = Vec::new();
        let reader = if from_ring {
            // Batches handed over before their write: wait until written.
            loop {
                let notify = {
                    let r = ring.lock();
                    if r.done >= r.pushed {
                        changes.extend(
                            r.changes
                                .iter()
                                .filter(|(t, k)| {
                                    *t > from
                                        && *t <= resolved
                                        && atoll_keys::in_range(k, &start, &end)
                                })
                                .map(|(t, k)| (*t, k.clone(), None)),
                        );
                        break;
                    }
                    r.notify.clone()
                };
                let notified = notify.notified();
                let written = {
                    let r = ring.lock();
                    r.done >= r.pushed
                };
                if written {
                    continue;
                }
                let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
            }
            MvccReader::new(self.router.engine().snapshot())
        } else {
            changes.extend(
                reader
                    .scan_changes(&start, &end, from, resolved)?
                    .into_iter()
                    .map(|(k, t, w)| (t, k, Some(w))),
            );
            reader
        };
        changes.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        changes.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        let max_bytes = if req.max_bytes == 0 {
            MAX_ANSWER_BYTES
        } else {
            req.max_bytes.min(MAX_ANSWER_BYTES)
        };
        let mut bytes = 0;
        let mut events = Vec::with_capacity(changes.len());
        let mut changes = changes.into_iter().peekable();
        while let Some(&(ts_now, _, _)) = changes.peek() {
            // One commit timestamp at a time: never split a transaction's changes.
            if bytes > max_bytes && !events.is_empty() {
                resolved = ts_now - 1;
                break;
            }
            while let Some((t, key, write)) = changes.next_if(|c| c.0 == ts_now) {
                let write = match write {
                    Some(w) => w,
                    None => reader.data_write_at(&key, t)?.ok_or_else(|| {
                        abort(format!("changes: the record of a change at {t} is missing"))
                    })?,
                };
                let e = event_of(&reader, key, t, &write, req.prev_kv)?;
                bytes += event_bytes(&e);
                events.push(e);
            }
        }
        resp.events = events;
        resp.resolved_version = resolved;
        Ok(())
    }
}
