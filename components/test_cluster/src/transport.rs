//! An in-process transport between the stores of a test cluster, with composable filters:
//! drop, delay, partition, isolate a store, one region only, one message type only.
//! Filters see every message (snapshots included) at flush time.

use atoll_engine::KvEngine;
use atoll_proto::raft_serverpb::{RaftMessage, SnapshotMeta};
use atoll_raftstore::snap::SnapKey;
use atoll_raftstore::{PeerId, RaftRouter, RegionId, StoreId, Transport};
use parking_lot::{Mutex, RwLock};
use protobuf::Message as _;
use raft::eraftpb::MessageType;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    Delay(Duration),
}

pub trait Filter: Send + Sync {
    fn check(&self, msg: &RaftMessage) -> Verdict;
}

fn from_store(m: &RaftMessage) -> u64 {
    m.from_peer.as_ref().map_or(0, |p| p.store_id)
}
fn to_store(m: &RaftMessage) -> u64 {
    m.to_peer.as_ref().map_or(0, |p| p.store_id)
}

/// Drops everything to and from one store.
pub struct IsolateStore(pub u64);
impl Filter for IsolateStore {
    fn check(&self, m: &RaftMessage) -> Verdict {
        if from_store(m) == self.0 || to_store(m) == self.0 {
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    }
}

/// Stores only talk within their own group.
pub struct Partition(pub Vec<HashSet<u64>>);
impl Filter for Partition {
    fn check(&self, m: &RaftMessage) -> Verdict {
        let (f, t) = (from_store(m), to_store(m));
        let same = self.0.iter().any(|g| g.contains(&f) && g.contains(&t));
        if same {
            Verdict::Pass
        } else {
            Verdict::Drop
        }
    }
}

/// Drops messages from `from` to `to` (one direction).
pub struct DropPath {
    pub from: u64,
    pub to: u64,
}
impl Filter for DropPath {
    fn check(&self, m: &RaftMessage) -> Verdict {
        if from_store(m) == self.from && to_store(m) == self.to {
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    }
}

/// Applies `inner` to one region's messages only.
pub struct RegionOnly<F: Filter> {
    pub region_id: u64,
    pub inner: F,
}
impl<F: Filter> Filter for RegionOnly<F> {
    fn check(&self, m: &RaftMessage) -> Verdict {
        if m.region_id == self.region_id {
            self.inner.check(m)
        } else {
            Verdict::Pass
        }
    }
}

/// Drops every message.
pub struct DropAll;
impl Filter for DropAll {
    fn check(&self, _: &RaftMessage) -> Verdict {
        Verdict::Drop
    }
}

/// Drops raft messages of one type.
pub struct DropType(pub MessageType);
impl Filter for DropType {
    fn check(&self, m: &RaftMessage) -> Verdict {
        match raft::eraftpb::Message::parse_from_bytes(&m.message) {
            Ok(r) if r.get_msg_type() == self.0 && m.extra == 0 => Verdict::Drop,
            _ => Verdict::Pass,
        }
    }
}

/// Delays every message by a fixed time.
pub struct Delay(pub Duration);
impl Filter for Delay {
    fn check(&self, _: &RaftMessage) -> Verdict {
        Verdict::Delay(self.0)
    }
}

/// Drops each message with probability `p` (seeded).
pub struct DropRandomly {
    pub p: f64,
    rng: Mutex<rand::rngs::StdRng>,
}
impl DropRandomly {
    pub fn new(p: f64, seed: u64) -> Self {
        DropRandomly {
            p,
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
        }
    }
}
impl Filter for DropRandomly {
    fn check(&self, _: &RaftMessage) -> Verdict {
        if self.rng.lock().gen_bool(self.p) {
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    }
}

/// The switchboard every store's transport hands messages to.
pub struct SimNetwork<E: KvEngine> {
    routers: RwLock<HashMap<u64, RaftRouter<E>>>,
    filters: RwLock<Vec<(u64, Arc<dyn Filter>)>>,
    next_filter: AtomicU64,
    delayed: Mutex<Vec<(std::time::Instant, RaftMessage)>>,
    pub delivered: AtomicU64,
    pub dropped: AtomicU64,
}

impl<E: KvEngine> Default for SimNetwork<E> {
    fn default() -> Self {
        SimNetwork {
            routers: RwLock::new(HashMap::new()),
            filters: RwLock::new(vec![]),
            next_filter: AtomicU64::new(1),
            delayed: Mutex::new(vec![]),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }
}

impl<E: KvEngine> SimNetwork<E> {
    pub fn new() -> Arc<Self> {
        let net = Arc::new(Self::default());
        let weak = Arc::downgrade(&net);
        std::thread::Builder::new()
            .name("sim-net-delay".into())
            .spawn(move || {
                let mut last_keepalive = std::time::Instant::now();
                loop {
                    std::thread::sleep(Duration::from_millis(2));
                    let Some(net) = weak.upgrade() else { return };
                    net.deliver_due();
                    if last_keepalive.elapsed() >= Duration::from_secs(1) {
                        last_keepalive = std::time::Instant::now();
                        net.keepalive();
                    }
                }
            })
            .expect("spawn");
        net
    }

    pub fn add_router(&self, store_id: u64, r: RaftRouter<E>) {
        self.routers.write().insert(store_id, r);
    }

    pub fn remove_router(&self, store_id: u64) {
        self.routers.write().remove(&store_id);
    }

    pub fn add_filter(&self, f: impl Filter + 'static) -> u64 {
        let id = self.next_filter.fetch_add(1, Ordering::SeqCst);
        self.filters.write().push((id, Arc::new(f)));
        id
    }

    pub fn remove_filter(&self, id: u64) {
        self.filters.write().retain(|(i, _)| *i != id);
    }

    pub fn clear_filters(&self) {
        self.filters.write().clear();
    }

    fn verdict(&self, m: &RaftMessage) -> Verdict {
        let mut delay = Duration::ZERO;
        for (_, f) in self.filters.read().iter() {
            match f.check(m) {
                Verdict::Drop => return Verdict::Drop,
                Verdict::Delay(d) => delay = delay.max(d),
                Verdict::Pass => {}
            }
        }
        if delay.is_zero() {
            Verdict::Pass
        } else {
            Verdict::Delay(delay)
        }
    }

    fn router(&self, store_id: u64) -> Option<RaftRouter<E>> {
        self.routers.read().get(&store_id).cloned()
    }

    /// What the real transport's keep-alives do: every store hears from every other one it
    /// can reach (through the filters, like any message) once a second.
    fn keepalive(&self) {
        let routers: Vec<(u64, RaftRouter<E>)> = self
            .routers
            .read()
            .iter()
            .map(|(id, r)| (*id, r.clone()))
            .collect();
        for (from, _) in &routers {
            for (to, r) in &routers {
                if from == to {
                    continue;
                }
                let probe = RaftMessage {
                    from_peer: Some(atoll_proto::metapb::Peer {
                        store_id: *from,
                        ..Default::default()
                    }),
                    to_peer: Some(atoll_proto::metapb::Peer {
                        store_id: *to,
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                if self.verdict(&probe) == Verdict::Pass {
                    r.on_store_heard(StoreId(*from));
                }
            }
        }
    }

    fn deliver(&self, m: RaftMessage) {
        match self.router(to_store(&m)) {
            Some(r) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                r.on_store_heard(StoreId(from_store(&m)));
                r.send_raft_message(m);
            }
            None => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                // The sender's transport would notice the dead connection.
                if let Some(s) = self.router(from_store(&m)) {
                    s.report_unreachable(StoreId(to_store(&m)));
                }
            }
        }
    }

    fn route(&self, m: RaftMessage) {
        match self.verdict(&m) {
            Verdict::Pass => self.deliver(m),
            Verdict::Drop => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Delay(d) => self.delayed.lock().push((std::time::Instant::now() + d, m)),
        }
    }

    fn deliver_due(&self) {
        let now = std::time::Instant::now();
        let due: Vec<RaftMessage> = {
            let mut d = self.delayed.lock();
            let (ready, rest): (Vec<_>, Vec<_>) = d.drain(..).partition(|(t, _)| *t <= now);
            *d = rest;
            ready.into_iter().map(|(_, m)| m).collect()
        };
        for m in due {
            self.deliver(m);
        }
    }

    /// Copies a generated snapshot to the receiver and delivers its message (off the caller's
    /// thread, like a real snapshot stream).
    fn send_snapshot(self: &Arc<Self>, m: RaftMessage, meta: SnapshotMeta) {
        let net = self.clone();
        std::thread::spawn(move || {
            let from = net.router(from_store(&m));
            let region_id = m.region_id;
            let to_peer = m.to_peer.as_ref().map_or(0, |p| p.id);
            let ok = (|| {
                if net.verdict(&m) == Verdict::Drop {
                    return false;
                }
                let (Some(from), Some(to)) = (from.clone(), net.router(to_store(&m))) else {
                    return false;
                };
                let key = SnapKey::from_meta(&meta);
                let src = from.snap_mgr().gen_path(&key);
                let dst = to.snap_mgr().recv_path(&key);
                if std::fs::copy(&src, &dst).is_err() {
                    return false;
                }
                to.on_snapshot_received();
                to.send_raft_message(m);
                true
            })();
            if let Some(f) = from {
                f.report_snapshot_status(RegionId(region_id), PeerId(to_peer), ok);
            }
        });
    }
}

/// One store's end of the simulated network.
pub struct SimTransport<E: KvEngine> {
    net: Arc<SimNetwork<E>>,
    pending: Mutex<Vec<RaftMessage>>,
}

impl<E: KvEngine> SimTransport<E> {
    pub fn new(net: Arc<SimNetwork<E>>) -> Self {
        SimTransport {
            net,
            pending: Mutex::new(vec![]),
        }
    }
}

impl<E: KvEngine> Transport for SimTransport<E> {
    fn send(&self, msg: RaftMessage) -> bool {
        self.pending.lock().push(msg);
        true
    }

    fn send_snapshot(&self, msg: RaftMessage, meta: SnapshotMeta) -> bool {
        self.net.send_snapshot(msg, meta);
        true
    }

    fn flush(&self) {
        let msgs = std::mem::take(&mut *self.pending.lock());
        for m in msgs {
            self.net.route(m);
        }
    }
}
