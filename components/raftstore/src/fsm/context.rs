//! `StoreContext`: everything a store's threads share (engine, routers, queues to the workers,
//! the store's meta, metrics), built with no thread running. A leaf for its users: it names the
//! FSM and task types but none of the code that handles them, so every poller, worker and
//! feature module can be written against it.

use crate::batch::{BatchSystem, Router};
use crate::fsm::apply::ApplyFsm;
use crate::fsm::peer::PeerFsm;
use crate::liveness::{StoreLiveness, Transition};
use crate::meta::StoreMeta;
use crate::metrics::StoreMetrics;
use crate::msg::{PeerMsg, StoreMsg};
use crate::observer::ApplyObserver;
use crate::snap::SnapManager;
use crate::task::{PdTask, RegionTask, SplitCheckMsg};
use crate::transport::Transport;
use crate::Config;
use atoll_engine::KvEngine;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Messages queued for the store thread before more are dropped.
pub const STORE_QUEUE_CAPACITY: usize = 4096;

/// Everything a store's threads share.
pub struct StoreContext<E: KvEngine> {
    pub store_id: u64,
    pub cfg: Arc<Config>,
    pub engine: E,
    pub router: Arc<Router<PeerFsm<E>>>,
    pub apply_router: Arc<Router<ApplyFsm<E>>>,
    pub store_tx: Sender<StoreMsg>,
    pub meta: Arc<Mutex<StoreMeta>>,
    pub trans: Arc<dyn Transport>,
    pub pd_tx: tokio::sync::mpsc::Sender<PdTask>,
    pub region_tx: Sender<RegionTask<E>>,
    pub split_tx: Sender<SplitCheckMsg<E>>,
    pub snap_mgr: SnapManager,
    pub metrics: StoreMetrics,
    pub logger: slog::Logger,
    pub(crate) awake: Mutex<HashSet<u64>>,
    read_id: AtomicU64,
    /// When this store started (a restarted store holds its votes for a while after it).
    pub started_at: Instant,
    /// When each other store was last heard from (see [`crate::liveness`]).
    pub liveness: StoreLiveness,
    /// Bytes of committed entries handed to the apply side and not applied yet, store-wide
    /// (bounded by `apply-pending-memory-limit`; see `Peer::apply_budget`).
    pub apply_pending_bytes: AtomicU64,
    /// Told about applied writes to the `write` column family (set once, by the storage
    /// layer's change log; see [`crate::observer`]).
    pub observer: std::sync::OnceLock<Arc<dyn ApplyObserver>>,
}

/// The receiving ends of a store context's queues (the store's threads own them).
pub struct StoreReceivers<E: KvEngine> {
    pub store_rx: Receiver<StoreMsg>,
    pub region_rx: Receiver<RegionTask<E>>,
    pub split_rx: Receiver<SplitCheckMsg<E>>,
    pub pd_rx: tokio::sync::mpsc::Receiver<PdTask>,
}

/// The two batch systems of a store (raft and apply), not started.
pub type BatchSystems<E> = (BatchSystem<PeerFsm<E>>, BatchSystem<ApplyFsm<E>>);

impl<E: KvEngine> StoreContext<E> {
    /// The context, its batch systems (no poller started) and the receivers of its queues:
    /// everything a store shares, with no thread running (the store starts them; unit tests
    /// drive pollers by hand).
    pub fn build(
        store_id: u64,
        cfg: Config,
        engine: E,
        trans: Arc<dyn Transport>,
        snap_mgr: SnapManager,
    ) -> (Arc<Self>, BatchSystems<E>, StoreReceivers<E>) {
        let cfg = Arc::new(cfg);
        let raft_system = BatchSystem::<PeerFsm<E>>::new(cfg.mailbox_capacity, cfg.max_batch_size);
        // Everything sent to an apply mailbox is force-sent by the raft side; what is queued
        // there is bounded by apply flow control (`apply-max-pending-size` per region,
        // `apply-pending-memory-limit` per store), not by a count of messages.
        let apply_system = BatchSystem::<ApplyFsm<E>>::new(usize::MAX / 2, cfg.max_batch_size);
        let (store_tx, store_rx) = crossbeam_channel::bounded(STORE_QUEUE_CAPACITY);
        let (region_tx, region_rx) = crossbeam_channel::bounded(4096);
        let (split_tx, split_rx) = crossbeam_channel::bounded(1024);
        let (pd_tx, pd_rx) = tokio::sync::mpsc::channel(8192);
        let logger = atoll_util::logging::raft_logger(slog::o!("store_id" => store_id));
        let ctx = Arc::new(StoreContext {
            store_id,
            cfg: cfg.clone(),
            engine,
            router: raft_system.router(),
            apply_router: apply_system.router(),
            store_tx,
            meta: Arc::new(Mutex::new(StoreMeta::new(store_id))),
            trans,
            pd_tx,
            region_tx,
            split_tx,
            snap_mgr,
            metrics: StoreMetrics::default(),
            logger,
            awake: Mutex::new(HashSet::new()),
            read_id: AtomicU64::new(0),
            started_at: Instant::now(),
            liveness: StoreLiveness::new(cfg.store_liveness_timeout.0),
            apply_pending_bytes: AtomicU64::new(0),
            observer: std::sync::OnceLock::new(),
        });
        let receivers = StoreReceivers {
            store_rx,
            region_rx,
            split_rx,
            pd_rx,
        };
        (ctx, (raft_system, apply_system), receivers)
    }

    pub fn set_awake(&self, region_id: u64, awake: bool) {
        let mut s = self.awake.lock();
        if awake {
            s.insert(region_id);
        } else {
            s.remove(&region_id);
        }
    }

    pub fn awake_count(&self) -> usize {
        self.awake.lock().len()
    }

    pub fn next_read_id(&self) -> u64 {
        self.read_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Tells the store thread something; dropped (and counted) if its queue is full: every
    /// store message is either retried by its sender (raft messages) or idempotent.
    pub fn send_store_msg(&self, msg: StoreMsg) {
        if self.store_tx.try_send(msg).is_err() {
            self.metrics.on_dropped("store_queue_full");
        }
    }

    /// Acts on a store turning down or up (see [`crate::liveness`]).
    pub fn on_liveness(&self, t: Transition) {
        match t {
            Transition::Down(store_id) => {
                tracing::info!(store_id, "store is down (silent or unreachable)");
                self.send_store_msg(StoreMsg::StoreDown { store_id });
            }
            Transition::Up(store_id) => tracing::info!(store_id, "store is up again"),
        }
    }

    /// Hands `task` to the PD worker; false if its queue is full (the task is dropped).
    pub fn schedule_pd(&self, task: PdTask) -> bool {
        if self.pd_tx.try_send(task).is_err() {
            self.metrics.on_dropped("pd_queue_full");
            return false;
        }
        true
    }

    /// Hands the messages parked for `region_id` (they arrived before its peer existed) to
    /// its peer.
    pub fn deliver_parked(&self, region_id: u64) {
        for m in self.meta.lock().take_parked(region_id) {
            let _ = self
                .router
                .force_send(region_id, PeerMsg::RaftMessage(Box::new(m)));
        }
    }
}
