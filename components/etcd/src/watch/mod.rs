//! etcd's Watch service over Atoll's sharded change feed (`docs/design/watch.md`).
//!
//! | module | owns |
//! | --- | --- |
//! | [`feed`] | a change feed over one key range: its regions' changes merged in revision order, released up to their smallest resolved version |
//! | this module | the hub of shared feeds, one watcher's life, the gRPC stream |
//!
//! Every watcher reads a feed through a cursor (the revision up to which it has sent
//! everything). Watchers of the same range and `prev_kv` share one feed ([`WatchHub`]); the
//! shared feed keeps a bounded history and never waits for a reader. A watcher that starts in
//! the past, or falls behind the shared history (a slow reader), reads a private feed from
//! its cursor — a catch-up from MVCC history that stops fetching while its reader is
//! not keeping up — until its cursor reaches the shared history, then joins it. So memory
//! per watcher is bounded, and a slow watcher never slows writes or other watchers.

pub mod feed;

use crate::auth::{Caller, Need};
use crate::context::EtcdContext;
use crate::errors;
use atoll_proto::etcdserverpb::watch_create_request::FilterType;
use atoll_proto::etcdserverpb::watch_request::RequestUnion;
use atoll_proto::etcdserverpb::watch_server::Watch;
use atoll_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use atoll_proto::mvccpb::event::EventType;
use atoll_proto::mvccpb::Event;
use feed::{Feed, FeedError, Read};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// History a shared feed keeps for readers that are behind.
const SHARED_HISTORY_BYTES: usize = 16 << 20;
/// History a private (catch-up) feed fetches ahead of its reader.
const PRIVATE_HISTORY_BYTES: usize = 4 << 20;
/// Events per response, by size (whole revisions; see `fragment` for one larger revision).
const RESPONSE_BYTES: usize = 1 << 20;
/// etcd's default request size limit, the size above which a `fragment` watch splits a
/// revision's events over several responses.
const FRAGMENT_BYTES: usize = (1 << 20) + (1 << 19);
/// A shared feed nobody reads is kept this long (watchers that reconnect find it).
const FEED_LINGER: Duration = Duration::from_secs(30);
/// Responses queued per stream before its watchers wait.
const STREAM_QUEUE: usize = 64;
/// etcd's default `--experimental-watch-progress-notify-interval`.
const PROGRESS_NOTIFY_INTERVAL: Duration = Duration::from_secs(600);
/// etcd's `clientv3.InvalidWatchID`: the id of answers that concern no one watch.
const INVALID_WATCH_ID: i64 = -1;

type FeedKey = (Vec<u8>, Vec<u8>, bool);

struct Shared {
    feed: Arc<Feed>,
    readers: usize,
}

/// The shared feeds of a store (one per watched range and `prev_kv`).
pub struct WatchHub {
    pub(crate) ctx: Arc<EtcdContext>,
    feeds: Mutex<HashMap<FeedKey, Shared>>,
}

/// A reader's hold on a shared feed; the feed stops a while after its last reader left.
struct SharedRef {
    hub: Arc<WatchHub>,
    key: FeedKey,
    feed: Arc<Feed>,
}

impl Drop for SharedRef {
    fn drop(&mut self) {
        let mut feeds = self.hub.feeds.lock();
        let Some(s) = feeds.get_mut(&self.key) else {
            return;
        };
        s.readers -= 1;
        if s.readers > 0 {
            return;
        }
        drop(feeds);
        let (hub, key, feed) = (self.hub.clone(), self.key.clone(), self.feed.clone());
        tokio::spawn(async move {
            tokio::time::sleep(FEED_LINGER).await;
            let mut feeds = hub.feeds.lock();
            if feeds
                .get(&key)
                .is_some_and(|s| s.readers == 0 && Arc::ptr_eq(&s.feed, &feed))
            {
                feeds.remove(&key);
                feed.stop();
            }
        });
    }
}

impl WatchHub {
    pub fn new(ctx: Arc<EtcdContext>) -> Arc<WatchHub> {
        Arc::new(WatchHub {
            ctx,
            feeds: Mutex::new(HashMap::new()),
        })
    }

    /// Shared feeds running (metrics, tests).
    pub fn feeds(&self) -> usize {
        self.feeds.lock().len()
    }

    /// The shared feed of `key`, started from `now` (a fresh revision) if there is none.
    fn acquire(self: &Arc<Self>, key: FeedKey, now: u64) -> SharedRef {
        let mut feeds = self.feeds.lock();
        let s = feeds.entry(key.clone()).or_insert_with(|| Shared {
            feed: Feed::start(
                self.ctx.client.clone(),
                key.0.clone(),
                key.1.clone(),
                key.2,
                now,
                true,
                SHARED_HISTORY_BYTES,
            ),
            readers: 0,
        });
        s.readers += 1;
        SharedRef {
            hub: self.clone(),
            key,
            feed: s.feed.clone(),
        }
    }
}

/// etcd's key and range_end as Atoll's `[start, end)`: no range_end is the key alone, `"\0"`
/// every key from the key on. Cut at the system key space (`atoll_keys::SYSTEM_PREFIX`): its
/// records are never watched (a range there is empty).
pub fn watch_range(key: &[u8], range_end: &[u8]) -> (Vec<u8>, Vec<u8>) {
    match range_end {
        [] if atoll_keys::is_system_key(key) => (key.to_vec(), key.to_vec()),
        [] => {
            let mut end = key.to_vec();
            end.push(0);
            (key.to_vec(), end)
        }
        [0] => (key.to_vec(), atoll_keys::user_range_end(&[])),
        e => (key.to_vec(), atoll_keys::user_range_end(e)),
    }
}

/// A request to one watcher from its stream: a progress request runs Freeze on every watcher
/// of the stream, then Advance to the largest revision any of them reached (or a fresh one),
/// answers, then Thaw. So the answer's revision is at or above every event sent before it,
/// and every event at or below it was sent before it.
enum Ctl {
    /// Send nothing more until told; reply with the cursor.
    Freeze(oneshot::Sender<u64>),
    /// Send everything up to this revision (nothing above it), then reply.
    Advance(u64, oneshot::Sender<()>),
    /// Go on.
    Thaw,
}

struct Watcher {
    id: i64,
    hub: Arc<WatchHub>,
    start: Vec<u8>,
    end: Vec<u8>,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    fragment: bool,
    progress_notify: bool,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
}

enum Source {
    Shared,
    Private(PrivateFeed),
}

/// A watcher's own catch-up feed, stopped when the watcher lets go of it.
struct PrivateFeed(Arc<Feed>);

impl Drop for PrivateFeed {
    fn drop(&mut self) {
        self.0.stop();
    }
}

impl Watcher {
    fn response(&self, revision: u64) -> WatchResponse {
        WatchResponse {
            header: Some(self.hub.ctx.header(revision as i64)),
            watch_id: self.id,
            ..Default::default()
        }
    }

    fn keep(&self, e: &Event) -> bool {
        let put = e.r#type == EventType::Put as i32;
        !((put && self.no_put) || (!put && self.no_delete))
    }

    /// Sends `events` (whole revisions, up to `upto`) as one response, or several when a
    /// `fragment` watch's response is too large. `false` when the stream is gone.
    async fn send_events(&self, events: Vec<Event>, upto: u64) -> bool {
        let size: usize = events.iter().map(feed::event_bytes).sum();
        if !self.fragment || size <= FRAGMENT_BYTES {
            let mut r = self.response(upto);
            r.events = events;
            return self.out.send(Ok(r)).await.is_ok();
        }
        let mut parts: Vec<Vec<Event>> = vec![vec![]];
        let mut bytes = 0;
        for e in events {
            let b = feed::event_bytes(&e);
            if bytes + b > FRAGMENT_BYTES && !parts.last().expect("one").is_empty() {
                parts.push(vec![]);
                bytes = 0;
            }
            bytes += b;
            parts.last_mut().expect("one").push(e);
        }
        let n = parts.len();
        for (i, p) in parts.into_iter().enumerate() {
            let mut r = self.response(upto);
            r.events = p;
            r.fragment = i + 1 < n;
            if self.out.send(Ok(r)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// The watcher's life after its created answer: from `cursor` on, until the stream or
    /// the watch is cancelled.
    async fn run(self, mut cursor: u64, mut ctl: mpsc::Receiver<Ctl>) {
        let now = cursor;
        let key: FeedKey = (self.start.clone(), self.end.clone(), self.prev_kv);
        let shared = self.hub.acquire(key, now);
        let mut source = if cursor < shared.feed.floor() {
            Source::Private(self.private_from(cursor))
        } else {
            Source::Shared
        };
        // While a progress request runs: the revision not to send past, and who waits for
        // the cursor to reach it.
        let mut cap = u64::MAX;
        let mut waiting: Option<oneshot::Sender<()>> = None;
        let mut last_sent = Instant::now();
        loop {
            if cursor >= cap {
                if let Some(tx) = waiting.take() {
                    let _ = tx.send(());
                }
            }
            let feed = match &source {
                Source::Shared => shared.feed.clone(),
                Source::Private(f) => f.0.clone(),
            };
            let mut changed = feed.subscribe();
            changed.borrow_and_update();
            match feed.read_after(cursor, RESPONSE_BYTES, cap) {
                Read::Failed(FeedError::Compacted(c)) => {
                    let mut r = self.response(c);
                    r.compact_revision = c as i64;
                    r.canceled = true;
                    r.cancel_reason = errors::compacted().message().to_string();
                    let _ = self.out.send(Ok(r)).await;
                    return;
                }
                Read::Behind => {
                    // Fell out of the shared history: catch up privately.
                    source = Source::Private(self.private_from(cursor));
                    continue;
                }
                Read::Batches(batches, upto) if upto > cursor => {
                    let events: Vec<Event> = batches
                        .iter()
                        .flat_map(|b| b.events.iter())
                        .filter(|e| self.keep(e))
                        .cloned()
                        .collect();
                    if !events.is_empty() {
                        if !self.send_events(events, upto).await {
                            return;
                        }
                        last_sent = Instant::now();
                    }
                    cursor = upto;
                    feed.consumed(cursor);
                    if matches!(source, Source::Private(_)) && cursor >= shared.feed.floor() {
                        source = Source::Shared;
                    }
                    continue;
                }
                Read::Batches(..) => {}
            }
            let notify_in = PROGRESS_NOTIFY_INTERVAL.saturating_sub(last_sent.elapsed());
            tokio::select! {
                _ = changed.changed() => {}
                c = ctl.recv() => match c {
                    Some(Ctl::Freeze(tx)) => {
                        cap = cursor;
                        let _ = tx.send(cursor);
                    }
                    Some(Ctl::Advance(rev, tx)) => {
                        cap = rev.max(cursor);
                        feed.want(cap);
                        waiting = Some(tx);
                    }
                    Some(Ctl::Thaw) => cap = u64::MAX,
                    None => return,
                },
                _ = tokio::time::sleep(notify_in), if self.progress_notify => {
                    if self.out.send(Ok(self.response(cursor))).await.is_err() {
                        return;
                    }
                    last_sent = Instant::now();
                }
                _ = self.out.closed() => return,
            }
        }
    }

    fn private_from(&self, cursor: u64) -> PrivateFeed {
        PrivateFeed(Feed::start(
            self.hub.ctx.client.clone(),
            self.start.clone(),
            self.end.clone(),
            self.prev_kv,
            cursor,
            false,
            PRIVATE_HISTORY_BYTES,
        ))
    }
}

/// The Watch service.
pub struct WatchService {
    hub: Arc<WatchHub>,
}

impl WatchService {
    pub fn new(ctx: Arc<EtcdContext>) -> Self {
        WatchService {
            hub: WatchHub::new(ctx),
        }
    }

    pub fn hub(&self) -> &Arc<WatchHub> {
        &self.hub
    }
}

/// One watch stream: its watchers by id.
struct StreamState {
    hub: Arc<WatchHub>,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
    watchers: HashMap<i64, (mpsc::Sender<Ctl>, tokio::task::JoinHandle<()>)>,
    next_id: i64,
    /// Progress requests of the stream run one at a time.
    progress: Arc<tokio::sync::Mutex<()>>,
    /// Who opened the stream (or why that could not be told): each create is checked for it.
    caller: Result<Caller, Status>,
}

impl StreamState {
    fn header(&self, revision: u64) -> WatchResponse {
        WatchResponse {
            header: Some(self.hub.ctx.header(revision as i64)),
            ..Default::default()
        }
    }

    /// etcd's `isWatchPermitted`: read on the watched range.
    async fn permitted(&self, c: &WatchCreateRequest) -> Result<(), Status> {
        let caller = self.caller.clone()?;
        self.hub
            .ctx
            .auth
            .check_fresh(&caller, &[Need::read(&c.key, &c.range_end)])
            .await
    }

    async fn fresh_revision(&self) -> u64 {
        self.hub.ctx.current_revision().await.max(0) as u64
    }

    async fn create(&mut self, c: WatchCreateRequest) -> bool {
        let now = self.fresh_revision().await;
        let refuse = |mut r: WatchResponse, why: &str| {
            r.watch_id = INVALID_WATCH_ID;
            r.created = true;
            r.canceled = true;
            r.cancel_reason = why.to_string();
            r
        };
        if let Err(e) = self.permitted(&c).await {
            // etcd's answer: a created-and-canceled response whose reason is the gRPC error.
            let why = format!("rpc error: code = {:?} desc = {}", e.code(), e.message());
            let r = refuse(self.header(now), &why);
            return self.out.send(Ok(r)).await.is_ok();
        }
        let (start, end) = watch_range(&c.key, &c.range_end);
        if !end.is_empty() && start >= end {
            let r = refuse(self.header(now), "mvcc: watcher range is empty");
            return self.out.send(Ok(r)).await.is_ok();
        }
        let id = if c.watch_id == 0 {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        } else if self.watchers.contains_key(&c.watch_id) {
            let r = refuse(
                self.header(now),
                "mvcc: duplicate watch ID provided on the WatchStream",
            );
            return self.out.send(Ok(r)).await.is_ok();
        } else {
            c.watch_id
        };
        if now == 0 {
            // No timestamp from PD: no revision to start from.
            let r = refuse(
                self.header(0),
                "atoll: no timestamp from PD to start the watch at",
            );
            return self.out.send(Ok(r)).await.is_ok();
        }
        let start_rev = c.start_revision.max(0) as u64;
        let cursor = if start_rev == 0 { now } else { start_rev - 1 };
        let mut created = self.header(now);
        created.watch_id = id;
        created.created = true;
        if self.out.send(Ok(created)).await.is_err() {
            return false;
        }
        let compacted = if start_rev > 0 {
            self.hub.ctx.pd.get_gc_safe_point().await.unwrap_or(0)
        } else {
            0
        };
        if start_rev > 0 && start_rev < compacted {
            let mut r = self.header(now);
            r.watch_id = id;
            r.canceled = true;
            r.compact_revision = compacted as i64;
            r.cancel_reason = errors::compacted().message().to_string();
            return self.out.send(Ok(r)).await.is_ok();
        }
        let filters = |f: FilterType| c.filters.contains(&(f as i32));
        let w = Watcher {
            id,
            hub: self.hub.clone(),
            start,
            end,
            prev_kv: c.prev_kv,
            no_put: filters(FilterType::Noput),
            no_delete: filters(FilterType::Nodelete),
            fragment: c.fragment,
            progress_notify: c.progress_notify,
            out: self.out.clone(),
        };
        let (tx, rx) = mpsc::channel(8);
        let task = tokio::spawn(w.run(cursor, rx));
        self.watchers.insert(id, (tx, task));
        true
    }

    async fn cancel(&mut self, id: i64) -> bool {
        let Some((_, task)) = self.watchers.remove(&id) else {
            return true;
        };
        task.abort();
        let _ = task.await;
        let now = self.fresh_revision().await;
        let mut r = self.header(now);
        r.watch_id = id;
        r.canceled = true;
        self.out.send(Ok(r)).await.is_ok()
    }

    /// etcd's progress request: answered (watch id -1) at a revision `R` at or above a fresh
    /// one and above every event already sent on the stream, once every watcher of the stream
    /// has sent all its events up to `R` (see [`Ctl`]). One at a time per stream.
    async fn progress(&mut self) {
        let now = self.fresh_revision().await;
        self.watchers.retain(|_, (_, task)| !task.is_finished());
        let ctls: Vec<mpsc::Sender<Ctl>> = self.watchers.values().map(|(c, _)| c.clone()).collect();
        let (out, hub, lock) = (self.out.clone(), self.hub.clone(), self.progress.clone());
        tokio::spawn(async move {
            let _one = lock.lock().await;
            let mut revision = now;
            let mut live = vec![];
            for ctl in ctls {
                let (tx, rx) = oneshot::channel();
                if ctl.send(Ctl::Freeze(tx)).await.is_ok() {
                    if let Ok(cursor) = rx.await {
                        revision = revision.max(cursor);
                        live.push(ctl);
                    }
                }
            }
            let mut acks = vec![];
            for ctl in &live {
                let (tx, rx) = oneshot::channel();
                if ctl.send(Ctl::Advance(revision, tx)).await.is_ok() {
                    acks.push(rx);
                }
            }
            for a in acks {
                let _ = a.await;
            }
            if revision > 0 {
                let r = WatchResponse {
                    header: Some(hub.ctx.header(revision as i64)),
                    watch_id: INVALID_WATCH_ID,
                    ..Default::default()
                };
                let _ = out.send(Ok(r)).await;
            }
            for ctl in &live {
                let _ = ctl.send(Ctl::Thaw).await;
            }
        });
    }
}

impl Drop for StreamState {
    fn drop(&mut self) {
        for (_, (_, task)) in self.watchers.drain() {
            task.abort();
        }
    }
}

impl WatchService {
    /// Serves one watch stream: the requests of `inbound`, answered on the returned channel
    /// (gRPC and the gateway both come through here).
    pub fn serve<S>(&self, inbound: S) -> mpsc::Receiver<Result<WatchResponse, Status>>
    where
        S: Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
    {
        self.serve_as(Ok(Caller::Store), inbound)
    }

    /// [`WatchService::serve`] for `caller`: each create is checked for read on its range.
    pub fn serve_as<S>(
        &self,
        caller: Result<Caller, Status>,
        mut inbound: S,
    ) -> mpsc::Receiver<Result<WatchResponse, Status>>
    where
        S: Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
    {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let mut state = StreamState {
            hub: self.hub.clone(),
            out: tx,
            watchers: HashMap::new(),
            next_id: 0,
            progress: Arc::new(tokio::sync::Mutex::new(())),
            caller,
        };
        tokio::spawn(async move {
            WATCH_STREAMS.inc();
            let _open = stream_closed_on_drop();
            loop {
                // A client that stops reading ends the stream even if it never closes its
                // request side (the gateway's request body is finite and then pends).
                let req = tokio::select! {
                    biased;
                    _ = state.out.closed() => return,
                    r = inbound.next() => r,
                };
                let Some(Ok(req)) = req else { break };
                let ok = match req.request_union {
                    Some(RequestUnion::CreateRequest(c)) => state.create(c).await,
                    Some(RequestUnion::CancelRequest(c)) => state.cancel(c.watch_id).await,
                    Some(RequestUnion::ProgressRequest(_)) => {
                        state.progress().await;
                        true
                    }
                    None => true,
                };
                if !ok {
                    return;
                }
            }
            // The client stopped sending: its watches go on until it stops reading.
            state.out.closed().await;
        });
        rx
    }
}

atoll_util::metric!(
    /// Watch streams open on this store (gRPC and the gateway's `/v3/watch`).
    static WATCH_STREAMS: atoll_util::metrics::IntGauge = int_gauge(
        "atoll_etcd_watch_streams",
        "Watch streams open on this store (gRPC and gateway)"
    )
);

/// Counts a watch stream as closed when its task ends, however it ends.
fn stream_closed_on_drop() -> impl Drop {
    struct Dec;
    impl Drop for Dec {
        fn drop(&mut self) {
            WATCH_STREAMS.dec();
        }
    }
    Dec
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.hub.ctx.auth.caller_of(&req).await;
        let rx = self.serve_as(caller, req.into_inner());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_ranges_map_to_atoll_ranges() {
        assert_eq!(watch_range(b"a", b""), (b"a".to_vec(), b"a\0".to_vec()));
        let sys = atoll_keys::SYSTEM_PREFIX.to_vec();
        assert_eq!(watch_range(b"a", b"\0"), (b"a".to_vec(), sys.clone()));
        assert_eq!(watch_range(b"", b"\0"), (vec![], sys.clone()));
        assert_eq!(
            watch_range(b"a", b"\xff\xff\xff\xff\xff"),
            (b"a".to_vec(), sys.clone())
        );
        assert_eq!(watch_range(&sys, b""), (sys.clone(), sys.clone()));
        assert_eq!(watch_range(b"a", b"b"), (b"a".to_vec(), b"b".to_vec()));
    }
}
