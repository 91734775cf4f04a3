//! A change feed over one key range: the changes of every region the range covers, merged
//! into one stream in revision order and released only up to the smallest resolved version
//! among those regions (`docs/design/watch.md`).
//!
//! The range is cut into *segments*, each inside one region as last seen. One task drives a
//! feed: it keeps one request in flight per segment ([`Client::region_changes`]): a long poll
//! while nothing is wanted of the segment, an immediate one while another segment has
//! changes above the segment's resolved version (or a progress request wants a revision). A
//! region that split answers for its part only; the segment splits there and the rest keeps
//! the old resolved version. A store that fails or a leader that moves is the client's
//! business (region errors, retries); a segment just asks again from its resolved version.
//! Changes buffered above the released watermark are keyed by (revision, key), so whatever
//! two answers both carry counts once.

use atoll_client::etcd::RegionChanges;
use atoll_client::Client;
use atoll_proto::mvccpb::Event;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a segment's long poll waits for a change at the leader.
const LONG_POLL_MS: u32 = 1000;
/// A segment that failed waits this long before it asks again.
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// A lock that holds a segment back this long is resolved as a reader would.
const LOCK_PATIENCE: Duration = Duration::from_millis(500);
/// How long a push of a transaction is remembered (it is renewed while the lock is met).
const PUSHED_KEPT: Duration = Duration::from_secs(60);

/// The events of one revision, released together.
#[derive(Clone, Debug)]
pub struct Batch {
    pub revision: u64,
    pub events: Arc<Vec<Event>>,
    pub bytes: usize,
}

/// Why a feed stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeedError {
    /// History below this revision is gone (the GC safe point).
    Compacted(u64),
}

/// What a reader finds in a feed past its cursor.
pub enum Read {
    /// Batches above the cursor, and the watermark they are complete up to.
    Batches(Vec<Batch>, u64),
    /// Events above the cursor were evicted: the reader must catch up elsewhere.
    Behind,
    Failed(FeedError),
}

struct History {
    batches: VecDeque<Batch>,
    bytes: usize,
    /// Every event above `floor` is in `batches` (or not released yet).
    floor: u64,
    /// Every event at or below it is released.
    released: u64,
    error: Option<FeedError>,
}

/// A feed's shared state: readers (watchers) read its history; its task writes it.
pub struct Feed {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
    pub prev_kv: bool,
    /// Shared feeds evict old batches (a slow reader catches up elsewhere); a private feed
    /// (one reader catching up) stops fetching while its history is full instead.
    shared: bool,
    max_bytes: usize,
    history: Mutex<History>,
    released: watch::Sender<u64>,
    /// The revision some reader wants the feed to be complete up to (progress requests).
    target: watch::Sender<u64>,
    /// Set when the feed should stop (no reader left).
    stopped: AtomicBool,
    /// Woken when a private feed's reader made room.
    room: tokio::sync::Notify,
}

impl Feed {
    /// A feed of `[start, end)` (empty `end`: unbounded) complete from just above `from`,
    /// driven by a task on the current runtime until [`Feed::stop`].
    pub fn start(
        client: Arc<Client>,
        start: Vec<u8>,
        end: Vec<u8>,
        prev_kv: bool,
        from: u64,
        shared: bool,
        max_bytes: usize,
    ) -> Arc<Feed> {
        let feed = Arc::new(Feed {
            start,
            end,
            prev_kv,
            shared,
            max_bytes,
            history: Mutex::new(History {
                batches: VecDeque::new(),
                bytes: 0,
                floor: from,
                released: from,
                error: None,
            }),
            released: watch::Sender::new(from),
            target: watch::Sender::new(from),
            stopped: AtomicBool::new(false),
            room: tokio::sync::Notify::new(),
        });
        tokio::spawn(drive(feed.clone(), client, from));
        feed
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.target.send_modify(|_| {});
        self.room.notify_one();
    }

    /// The watermark: every event at or below it has been released.
    pub fn released(&self) -> u64 {
        *self.released.borrow()
    }

    /// Every event above it is still in the history.
    pub fn floor(&self) -> u64 {
        self.history.lock().floor
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.released.subscribe()
    }

    /// Asks the feed to be complete up to `revision` soon (a progress request).
    pub fn want(&self, revision: u64) {
        self.target.send_if_modified(|t| {
            let more = revision > *t;
            *t = (*t).max(revision);
            more
        });
    }

    /// The batches above `cursor` and at or below `cap`, up to `max_bytes` of them (at least
    /// one), and the revision they are complete up to.
    pub fn read_after(&self, cursor: u64, max_bytes: usize, cap: u64) -> Read {
        let h = self.history.lock();
        if let Some(e) = &h.error {
            return Read::Failed(e.clone());
        }
        if cursor < h.floor {
            return Read::Behind;
        }
        let first = h.batches.partition_point(|b| b.revision <= cursor);
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut upto = h.released.min(cap);
        for b in h.batches.range(first..) {
            if b.revision > cap {
                break;
            }
            if !out.is_empty() && bytes + b.bytes > max_bytes {
                upto = out.last().map_or(cursor, |b: &Batch| b.revision);
                break;
            }
            bytes += b.bytes;
            out.push(b.clone());
        }
        drop(h);
        if !self.shared {
            self.room.notify_one();
        }
        Read::Batches(out, upto.max(cursor))
    }

    /// A private feed's reader is past `cursor`: what is at or below it can go.
    pub fn consumed(&self, cursor: u64) {
        if self.shared {
            return;
        }
        let mut h = self.history.lock();
        while h.batches.front().is_some_and(|b| b.revision <= cursor) {
            let b = h.batches.pop_front().expect("front exists");
            h.bytes -= b.bytes;
            h.floor = h.floor.max(b.revision);
        }
        drop(h);
        self.room.notify_one();
    }

    fn fail(&self, e: FeedError) {
        self.history.lock().error = Some(e);
        self.released.send_modify(|_| {});
    }

    /// Appends the batches of `(revision, key)`-ordered events up to `upto` and moves the
    /// watermark there.
    fn release(&self, events: Vec<Event>, upto: u64) {
        let mut h = self.history.lock();
        let mut i = 0;
        while i < events.len() {
            let rev = revision_of(&events[i]);
            let mut j = i;
            let mut bytes = 0;
            while j < events.len() && revision_of(&events[j]) == rev {
                bytes += event_bytes(&events[j]);
                j += 1;
            }
            h.batches.push_back(Batch {
                revision: rev,
                events: Arc::new(events[i..j].to_vec()),
                bytes,
            });
            h.bytes += bytes;
            i = j;
        }
        if self.shared {
            while h.bytes > self.max_bytes && h.batches.len() > 1 {
                let b = h.batches.pop_front().expect("more than one");
                h.bytes -= b.bytes;
                h.floor = h.floor.max(b.revision);
            }
        }
        h.released = h.released.max(upto);
        drop(h);
        self.released.send_if_modified(|r| {
            let more = upto > *r;
            *r = (*r).max(upto);
            more
        });
    }

    fn full(&self) -> bool {
        !self.shared && self.history.lock().bytes > self.max_bytes
    }
}

pub fn revision_of(e: &Event) -> u64 {
    e.kv.as_ref().map_or(0, |kv| kv.mod_revision as u64)
}

pub fn event_bytes(e: &Event) -> usize {
    let kv = |k: &Option<atoll_proto::mvccpb::KeyValue>| {
        k.as_ref().map_or(0, |k| k.key.len() + k.value.len() + 48)
    };
    kv(&e.kv) + kv(&e.prev_kv)
}

struct Segment {
    end: Vec<u8>,
    resolved: u64,
    /// A request is in flight.
    busy: bool,
    /// The in-flight request is a long poll (cancelled when the segment is wanted).
    long: bool,
    retry_at: Option<tokio::time::Instant>,
    /// Since when a lock has held this segment back.
    locked_since: Option<Instant>,
}

type Answer = (Vec<u8>, Option<atoll_client::Result<RegionChanges>>);

/// The feed's task (see the module doc).
async fn drive(feed: Arc<Feed>, client: Arc<Client>, from: u64) {
    let mut segments: BTreeMap<Vec<u8>, Segment> = BTreeMap::new();
    segments.insert(
        feed.start.clone(),
        Segment {
            end: feed.end.clone(),
            resolved: from,
            busy: false,
            long: false,
            retry_at: None,
            locked_since: None,
        },
    );
    // Changes above the watermark, not released yet.
    let mut pending: BTreeMap<(u64, Vec<u8>), Event> = BTreeMap::new();
    let mut released = from;
    let mut polls: FuturesUnordered<futures::future::BoxFuture<'static, Answer>> =
        FuturesUnordered::new();
    let mut target_rx = feed.target.subscribe();
    // Transactions this feed pushed (start_ts -> pushed above), shared with its requests.
    let pushed: Arc<Mutex<HashMap<u64, (u64, Instant)>>> = Arc::default();
    loop {
        if feed.stopped.load(Ordering::Acquire) {
            return;
        }
        // What is wanted: the newest change seen anywhere, or a progress request.
        let wanted = pending
            .keys()
            .next_back()
            .map_or(0, |(r, _)| *r)
            .max(*target_rx.borrow_and_update());
        let full = feed.full();
        for (start, seg) in segments.iter_mut() {
            if seg.busy || full {
                continue;
            }
            let long = seg.resolved >= wanted;
            let delay = seg.retry_at.take();
            seg.busy = true;
            seg.long = long;
            let (client, start, end, prev) =
                (client.clone(), start.clone(), seg.end.clone(), feed.prev_kv);
            let from = seg.resolved;
            let mut target = feed.target.subscribe();
            let pushed_now: HashMap<u64, u64> = {
                let mut p = pushed.lock();
                p.retain(|_, (_, at)| at.elapsed() < PUSHED_KEPT);
                p.iter().map(|(s, (ts, _))| (*s, *ts)).collect()
            };
            polls.push(Box::pin(async move {
                if let Some(at) = delay {
                    tokio::time::sleep_until(at).await;
                }
                let wait = if long { LONG_POLL_MS } else { 0 };
                let key = start.clone();
                let ask = client.region_changes(&start, &end, from, prev, wait, &pushed_now);
                if !long {
                    return (key, Some(ask.await));
                }
                // A long poll gives way as soon as this segment is wanted above `from`.
                tokio::select! {
                    r = ask => (key, Some(r)),
                    _ = async {
                        loop {
                            if target.changed().await.is_err() {
                                std::future::pending::<()>().await;
                            }
                            if *target.borrow() > from {
                                return;
                            }
                        }
                    } => (key, None),
                }
            }));
        }
        let answer = tokio::select! {
            Some(a) = polls.next() => Some(a),
            _ = target_rx.changed() => None,
            _ = feed.room.notified(), if full => None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => None,
        };
        let Some((start, answer)) = answer else {
            // A wanted revision rose: cancel long polls below it by waking their selects
            // (they watch the target themselves); loop to reissue.
            continue;
        };
        let Some(seg) = segments.get_mut(&start) else {
            continue;
        };
        seg.busy = false;
        let Some(answer) = answer else {
            continue; // a long poll gave way: asked again at once
        };
        let ch = match answer {
            Ok(ch) => ch,
            Err(e) => {
                tracing::debug!(error = %e, "change feed: a segment failed; asking again");
                seg.retry_at = Some(tokio::time::Instant::now() + RETRY_AFTER);
                continue;
            }
        };
        if ch.compacted > 0 {
            feed.fail(FeedError::Compacted(ch.compacted));
            return;
        }
        if let Some(lock) = &ch.lock {
            let since = *seg.locked_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= LOCK_PATIENCE {
                seg.locked_since = None;
                let client = client.clone();
                let lock = lock.clone();
                // Resolve (or push) it as a reader at a fresh timestamp would.
                tokio::spawn(async move {
                    if let Ok(ts) = client.tso().await {
                        let deadline =
                            tokio::time::Instant::now().into_std() + Duration::from_secs(5);
                        let _ = atoll_client::lock_resolver::resolve(
                            &client,
                            vec![lock],
                            ts,
                            deadline,
                            &mut vec![],
                        )
                        .await;
                    }
                });
            }
        } else {
            seg.locked_since = None;
        }
        let old_resolved = seg.resolved;
        let old_end = std::mem::replace(&mut seg.end, ch.end.clone());
        seg.resolved = seg.resolved.max(ch.resolved);
        if ch.end != old_end {
            // The region ends before the segment did: the rest is a segment of its own,
            // still resolved only as far as the whole was.
            segments.insert(
                ch.end.clone(),
                Segment {
                    end: old_end,
                    resolved: old_resolved,
                    busy: false,
                    long: false,
                    retry_at: None,
                    locked_since: None,
                },
            );
        }
        for e in ch.events {
            let rev = revision_of(&e);
            if rev > released {
                let key = e.kv.as_ref().map(|kv| kv.key.clone()).unwrap_or_default();
                pending.insert((rev, key), e);
            }
        }
        if let Some(((newest, _), _)) = pending.last_key_value() {
            // Every other segment must be resolved this far before these go out.
            feed.want(*newest);
        }
        let watermark = segments
            .values()
            .map(|s| s.resolved)
            .min()
            .unwrap_or(released);
        if watermark > released {
            let rest = pending.split_off(&(watermark + 1, Vec::new()));
            let out: Vec<Event> = std::mem::replace(&mut pending, rest)
                .into_values()
                .collect();
            released = watermark;
            feed.release(out, watermark);
        }
        merge_segments(&mut segments);
    }
}

/// Joins neighbouring idle segments that are resolved alike (a split and a merge back, or a
/// region that grew): fewer requests for the same range. A segment whose region is smaller
/// is cut again by its next answer.
fn merge_segments(segments: &mut BTreeMap<Vec<u8>, Segment>) {
    if segments.len() < 2 {
        return;
    }
    let mut last: Option<(Vec<u8>, Segment)> = None;
    for (k, s) in std::mem::take(segments) {
        match &mut last {
            Some((_, l)) if !l.busy && !s.busy && l.resolved == s.resolved && l.end == k => {
                l.end = s.end;
            }
            _ => {
                if let Some((lk, l)) = last.replace((k, s)) {
                    segments.insert(lk, l);
                }
            }
        }
    }
    if let Some((lk, l)) = last {
        segments.insert(lk, l);
    }
}
