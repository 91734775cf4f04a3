//! The store: wiring of pollers, workers and threads around one engine, the store thread that
//! creates peers for regions it learns of from messages, the single ticker, and
//! [`RaftRouter`], the handle the rest of the node uses to reach regions.

use crate::apply::{ApplyFsm, ApplyPoller};
use crate::batch::{BatchSystem, Router, SendError};
use crate::fsm_peer::{PeerFsm, RaftPoller};
use crate::liveness::{StoreLiveness, Transition};
use crate::meta::StoreMeta;
use crate::metrics::StoreMetrics;
use crate::msg::{
    CasualMessage, PeerMsg, ReadCallback, RegionSnapshot, StoreMsg, WriteCallback, WriteResponse,
};
use crate::pd_worker::PdTask;
use crate::snap::SnapManager;
use crate::storage;
use crate::transport::Transport;
use crate::worker::{self, RegionTask, SplitCheckMsg};
use crate::{util, Config, Error, Result};
use atoll_engine::{KvEngine, WriteBatch, CF_RAFT, DATA_CFS};
use atoll_pd_client::PdClient;
use atoll_proto::raft_cmdpb::{RaftCmdRequest, RaftRequestHeader};
use atoll_proto::raft_serverpb::{PeerState, RaftMessage, RegionLocalState};
use atoll_proto::{metapb, pdpb};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use protobuf::Message as PbMessage;
use raft::eraftpb::MessageType;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
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
    awake: Mutex<HashSet<u64>>,
    read_id: AtomicU64,
    /// When this store started (a restarted store holds its votes for a while after it).
    pub started_at: Instant,
    /// When each other store was last heard from (see [`crate::liveness`]).
    pub liveness: StoreLiveness,
    /// Bytes of committed entries handed to the apply side and not applied yet, store-wide
    /// (bounded by `apply-pending-memory-limit`; see `Peer::apply_budget`).
    pub apply_pending_bytes: AtomicU64,
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

    pub fn schedule_pd(&self, task: PdTask) {
        if self.pd_tx.try_send(task).is_err() {
            self.metrics.on_dropped("pd_queue_full");
        }
    }

    /// Creates and starts an initialized peer whose states are already in the engine.
    pub fn create_peer(
        &self,
        region: metapb::Region,
        peer: metapb::Peer,
        campaign: bool,
    ) -> Result<()> {
        let mut fsm = PeerFsm::create(self, region.clone(), peer)?;
        fsm.peer.campaign_on_start = campaign;
        let apply_state = fsm.peer.raft_group.store().apply_state;
        self.apply_router.register(
            region.id,
            ApplyFsm::new(region.clone(), peer.id, apply_state),
        );
        self.router.register(region.id, fsm);
        let _ = self.router.force_send(region.id, PeerMsg::Start);
        for m in self.meta.lock().take_parked(region.id) {
            let _ = self
                .router
                .force_send(region.id, PeerMsg::RaftMessage(Box::new(m)));
        }
        Ok(())
    }

    fn create_uninitialized_peer(&self, region_id: u64, peer: metapb::Peer) -> Result<()> {
        let fsm = PeerFsm::create_uninitialized(self, region_id, peer)?;
        let region = metapb::Region {
            id: region_id,
            ..Default::default()
        };
        let apply_state = fsm.peer.raft_group.store().apply_state;
        self.apply_router
            .register(region_id, ApplyFsm::new(region, peer.id, apply_state));
        self.router.register(region_id, fsm);
        let _ = self.router.force_send(region_id, PeerMsg::Start);
        Ok(())
    }
}

/// What a store needs to start.
pub struct StoreDeps<E: KvEngine> {
    pub store_id: u64,
    pub cfg: Config,
    pub engine: E,
    pub trans: Arc<dyn Transport>,
    pub pd: Arc<dyn PdClient>,
    pub snap_mgr: SnapManager,
    pub runtime: tokio::runtime::Handle,
    /// Extra statistics for store heartbeats (capacity etc.); region/leader counts are filled in.
    pub stats: Arc<dyn Fn() -> pdpb::StoreStats + Send + Sync>,
}

pub struct RaftStore<E: KvEngine> {
    ctx: Arc<StoreContext<E>>,
    raft_system: BatchSystem<PeerFsm<E>>,
    apply_system: BatchSystem<ApplyFsm<E>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop: Arc<AtomicBool>,
    pd_worker: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl<E: KvEngine> RaftStore<E> {
    pub fn start(deps: StoreDeps<E>) -> Result<Self> {
        deps.cfg
            .validate()
            .map_err(|e| Error::Other(e.to_string()))?;
        let (ctx, systems, receivers) = StoreContext::build(
            deps.store_id,
            deps.cfg,
            deps.engine,
            deps.trans,
            deps.snap_mgr,
        );
        let cfg = ctx.cfg.clone();
        let (raft_system, apply_system) = systems;
        let StoreReceivers {
            store_rx,
            region_rx,
            split_rx,
            pd_rx,
        } = receivers;
        let store = RaftStore {
            ctx: ctx.clone(),
            raft_system,
            apply_system,
            threads: Mutex::new(vec![]),
            stop: Arc::new(AtomicBool::new(false)),
            pd_worker: Mutex::new(None),
        };
        let loaded = store.load_regions()?;
        let store_id = ctx.store_id;
        tracing::info!(store_id, regions = loaded, "store loaded its regions");
        let c = ctx.clone();
        store
            .raft_system
            .spawn("raftstore", cfg.store_pollers(), move |_| {
                RaftPoller::new(c.clone())
            });
        let c = ctx.clone();
        store
            .apply_system
            .spawn("apply", cfg.apply_pool_size, move |_| {
                ApplyPoller::new(c.clone())
            });
        for id in ctx.router.ids() {
            let _ = ctx.router.force_send(id, PeerMsg::Start);
        }
        let mut threads = store.threads.lock();
        let c = ctx.clone();
        threads.push(spawn("region-worker", move || {
            worker::run_region_worker(c, region_rx)
        }));
        let c = ctx.clone();
        threads.push(spawn("split-check", move || {
            worker::run_split_checker(c, split_rx)
        }));
        let c = ctx.clone();
        threads.push(spawn("store", move || run_store_thread(c, store_rx)));
        let c = ctx.clone();
        let stop = store.stop.clone();
        threads.push(spawn("ticker", move || run_ticker(c, stop)));
        drop(threads);
        let c = ctx.clone();
        let stats = deps.stats.clone();
        let stats_fn: Arc<dyn Fn() -> pdpb::StoreStats + Send + Sync> = Arc::new(move || {
            let mut s = stats();
            s.store_id = c.store_id;
            let meta = c.meta.lock();
            s.region_count = c.router.len() as u32;
            s.leader_count = meta.leader_count() as u32;
            let (send, recv, apply) = c.snap_mgr.stats();
            s.sending_snap_count = send as u32;
            s.receiving_snap_count = recv as u32;
            s.applying_snap_count = apply as u32;
            s
        });
        let h = deps
            .runtime
            .spawn(crate::pd_worker::run(ctx.clone(), deps.pd, pd_rx, stats_fn));
        *store.pd_worker.lock() = Some(h);
        Ok(store)
    }

    fn load_regions(&self) -> Result<usize> {
        let ctx = &self.ctx;
        let (start, end) = atoll_keys::region_state_range();
        let mut states: Vec<RegionLocalState> = vec![];
        ctx.engine
            .scan_cf(CF_RAFT, &start, Some(&end), false, |_, v| {
                match util::decode_msg::<RegionLocalState>(v) {
                    Ok(s) => states.push(s),
                    Err(e) => tracing::error!(error = %e, "undecodable region state"),
                }
                Ok(true)
            })?;
        let mut count = 0;
        for s in states {
            let Some(region) = s.region.clone() else {
                continue;
            };
            let state = PeerState::try_from(s.state).unwrap_or(PeerState::Normal);
            if state == PeerState::Tombstone {
                self.clean_tombstone(&region)?;
                continue;
            }
            let Some(peer) = util::find_peer(&region, ctx.store_id).cloned() else {
                tracing::warn!(
                    region_id = region.id,
                    "region state without a peer on this store; skipped"
                );
                continue;
            };
            if state == PeerState::Applying {
                tracing::info!(
                    region_id = region.id,
                    "resuming an interrupted snapshot apply"
                );
                worker::resume_snapshot_apply(ctx, &region)?;
            }
            ctx.meta.lock().set_region(&region);
            let fsm = PeerFsm::create(ctx, region.clone(), peer)?;
            let apply_state = fsm.peer.raft_group.store().apply_state;
            ctx.apply_router.register(
                region.id,
                ApplyFsm::new(region.clone(), peer.id, apply_state),
            );
            ctx.router.register(region.id, fsm);
            count += 1;
        }
        Ok(count)
    }

    /// Removes what a destroyed peer may have left behind (a crash mid-destroy).
    fn clean_tombstone(&self, region: &metapb::Region) -> Result<()> {
        if storage::load_raft_state(&self.ctx.engine, region.id)?.is_none() {
            return Ok(());
        }
        let mut wb = self.ctx.engine.write_batch();
        storage::delete_raft_state(&mut wb, region.id)?;
        self.ctx.engine.write(wb, true)?;
        Ok(())
    }

    pub fn router(&self) -> RaftRouter<E> {
        RaftRouter {
            ctx: self.ctx.clone(),
        }
    }

    pub fn context(&self) -> &Arc<StoreContext<E>> {
        &self.ctx
    }

    /// Stops every thread; unsent messages and unapplied entries stay in the log.
    pub fn shutdown(&self) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(h) = self.pd_worker.lock().take() {
            h.abort();
        }
        let _ = self.ctx.store_tx.send(StoreMsg::Stop);
        let _ = self.ctx.region_tx.send(RegionTask::Stop);
        let _ = self.ctx.split_tx.send(SplitCheckMsg::Stop);
        self.raft_system.shutdown();
        self.apply_system.shutdown();
        let threads: Vec<_> = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
        self.ctx.router.close_all();
        self.ctx.apply_router.close_all();
    }
}

impl<E: KvEngine> Drop for RaftStore<E> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .expect("spawn store thread")
}

fn run_ticker<E: KvEngine>(ctx: Arc<StoreContext<E>>, stop: Arc<AtomicBool>) {
    let tick = ctx.cfg.tick();
    let mut next = Instant::now() + tick;
    let mut ids = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next += tick;
        if next < Instant::now() {
            next = Instant::now() + tick;
        }
        let mut changes = vec![];
        ctx.liveness.check(Instant::now(), &mut changes);
        for t in changes {
            ctx.on_liveness(t);
        }
        ids.clear();
        ids.extend(ctx.awake.lock().iter().copied());
        for id in &ids {
            let _ = ctx.router.force_send(*id, PeerMsg::Tick);
        }
        crate::metrics::set_awake_regions(ids.len());
        crate::metrics::set_apply_pending(ctx.apply_pending_bytes.load(Ordering::Relaxed));
        crate::metrics::set_regions(ctx.router.len());
    }
}

fn run_store_thread<E: KvEngine>(ctx: Arc<StoreContext<E>>, rx: Receiver<StoreMsg>) {
    while let Ok(msg) = rx.recv() {
        match msg {
            StoreMsg::RaftMessage(m) => maybe_create_peer(&ctx, *m),
            StoreMsg::StoreDown { store_id } => wake_followers_of(&ctx, store_id),
            StoreMsg::PeerDestroyed { .. } => retry_parked(&ctx),
            StoreMsg::Stop => break,
        }
    }
}

/// A store went down: the followers here whose leader was there must elect a new one. Awake
/// ones will on their own; sleeping ones are woken, with their groups (once per transition:
/// a store that stays down costs nothing more).
fn wake_followers_of<E: KvEngine>(ctx: &Arc<StoreContext<E>>, store_id: u64) {
    let ids: Vec<u64> = ctx
        .meta
        .lock()
        .readers
        .iter()
        .filter(|(_, d)| d.term == 0 && d.leader.is_some_and(|l| l.store_id == store_id))
        .map(|(id, _)| *id)
        .collect();
    tracing::info!(
        store_id,
        regions = ids.len(),
        "waking followers of a down store's leaders"
    );
    for id in ids {
        let _ = ctx.router.force_send(id, PeerMsg::Wake);
    }
}

/// Parked messages whose range is now free create their peers.
fn retry_parked<E: KvEngine>(ctx: &Arc<StoreContext<E>>) {
    let ids: Vec<u64> = ctx.meta.lock().parked_msgs.keys().copied().collect();
    for id in ids {
        if ctx.router.mailbox(id).is_some() {
            for m in ctx.meta.lock().take_parked(id) {
                let _ = ctx.router.force_send(id, PeerMsg::RaftMessage(Box::new(m)));
            }
            continue;
        }
        let msgs = ctx.meta.lock().take_parked(id);
        for m in msgs {
            maybe_create_peer(ctx, m);
        }
    }
}

fn may_create_region(msg: &RaftMessage) -> bool {
    if msg.extra != 0 || msg.is_tombstone {
        return false;
    }
    match raft::eraftpb::Message::parse_from_bytes(&msg.message) {
        Ok(m) => matches!(
            m.get_msg_type(),
            MessageType::MsgRequestVote
                | MessageType::MsgRequestPreVote
                | MessageType::MsgAppend
                | MessageType::MsgHeartbeat
                | MessageType::MsgSnapshot
        ),
        Err(_) => false,
    }
}

fn maybe_create_peer<E: KvEngine>(ctx: &Arc<StoreContext<E>>, msg: RaftMessage) {
    let region_id = msg.region_id;
    let Some(to) = msg.to_peer else {
        return;
    };
    if to.store_id != ctx.store_id {
        ctx.metrics.on_dropped("store_not_match");
        return;
    }
    if ctx.router.mailbox(region_id).is_some() {
        let _ = ctx
            .router
            .force_send(region_id, PeerMsg::RaftMessage(Box::new(msg)));
        return;
    }
    if !may_create_region(&msg) {
        ctx.metrics.on_dropped("region_not_found");
        return;
    }
    // A tombstone blocks its own (and older) peers from coming back.
    match storage::load_region_state(&ctx.engine, region_id) {
        Ok(Some(s)) if s.state == PeerState::Tombstone as i32 => {
            let tomb = s.region.unwrap_or_default();
            let tomb_epoch = util::epoch(&tomb);
            let msg_epoch = msg.region_epoch.unwrap_or_default();
            let tomb_peer = util::find_peer(&tomb, ctx.store_id).map_or(0, |p| p.id);
            // A peer placed here again after the removal comes with a newer membership than the
            // tombstone's; anything else is from the past (e.g. a member that missed the removal
            // still addressing the removed peer) and must not bring it back as a zombie voter of
            // the old membership. (After removing itself the tombstone's region no longer names
            // this store, so the peer id alone cannot tell.)
            if msg_epoch.conf_ver <= tomb_epoch.conf_ver || to.id <= tomb_peer {
                ctx.metrics.on_dropped("tombstone");
                return;
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(region_id, error = %e, "load region state");
            return;
        }
    }
    {
        let mut meta = ctx.meta.lock();
        if meta.regions.contains_key(&region_id) {
            // Known here without a peer yet: a split being applied on this store is creating
            // it (it registers the range first). Hand the message over once the peer exists.
            meta.park_msg(msg);
            drop(meta);
            if ctx.router.mailbox(region_id).is_some() {
                for m in ctx.meta.lock().take_parked(region_id) {
                    let _ = ctx
                        .router
                        .force_send(region_id, PeerMsg::RaftMessage(Box::new(m)));
                }
            }
            return;
        }
        let overlaps = meta.overlapping(&msg.start_key, &msg.end_key, region_id);
        if !overlaps.is_empty() {
            // Most likely a split not yet applied here: keep the message for a while.
            meta.park_msg(msg);
            drop(meta);
            for id in overlaps {
                let _ = ctx
                    .router
                    .force_send(id, PeerMsg::Casual(CasualMessage::HeartbeatPd));
            }
            return;
        }
    }
    if let Err(e) = ctx.create_uninitialized_peer(region_id, to) {
        tracing::error!(region_id, error = %e, "create peer");
        return;
    }
    let _ = ctx
        .router
        .force_send(region_id, PeerMsg::RaftMessage(Box::new(msg)));
}

/// The handle the node's services use to reach regions.
pub struct RaftRouter<E: KvEngine> {
    ctx: Arc<StoreContext<E>>,
}

impl<E: KvEngine> Clone for RaftRouter<E> {
    fn clone(&self) -> Self {
        RaftRouter {
            ctx: self.ctx.clone(),
        }
    }
}

impl<E: KvEngine> RaftRouter<E> {
    pub fn store_id(&self) -> u64 {
        self.ctx.store_id
    }

    pub fn engine(&self) -> &E {
        &self.ctx.engine
    }

    pub fn config(&self) -> &Config {
        &self.ctx.cfg
    }

    pub fn metrics(&self) -> &StoreMetrics {
        &self.ctx.metrics
    }

    pub fn snap_mgr(&self) -> &SnapManager {
        &self.ctx.snap_mgr
    }

    /// A raft message from another store.
    pub fn send_raft_message(&self, msg: RaftMessage) {
        let to_store = msg.to_peer.as_ref().map_or(0, |p| p.store_id);
        if to_store != self.ctx.store_id {
            self.ctx.metrics.on_dropped("store_not_match");
            return;
        }
        let id = msg.region_id;
        match self
            .ctx
            .router
            .try_send(id, PeerMsg::RaftMessage(Box::new(msg)))
        {
            Ok(()) => {}
            Err(SendError::Full(_)) => self.ctx.metrics.on_dropped("mailbox_full"),
            Err(SendError::Closed(PeerMsg::RaftMessage(m))) => {
                self.ctx.send_store_msg(StoreMsg::RaftMessage(m));
            }
            Err(SendError::Closed(_)) => {}
        }
    }

    /// Proposes a command; `cb` runs once it is applied (or refused).
    pub fn propose(&self, cmd: RaftCmdRequest, cb: WriteCallback) {
        let id = cmd.header.as_ref().map_or(0, |h| h.region_id);
        match self.ctx.router.try_send(
            id,
            PeerMsg::RaftCommand {
                cmd: Box::new(cmd),
                cb,
            },
        ) {
            Ok(()) => {}
            Err(SendError::Full(PeerMsg::RaftCommand { cb, .. })) => cb(Err(Error::ServerIsBusy(
                format!("region {id} has too many pending requests"),
            ))),
            Err(SendError::Closed(PeerMsg::RaftCommand { cb, .. })) => {
                cb(Err(Error::RegionNotFound(id)))
            }
            Err(_) => {}
        }
    }

    pub async fn propose_async(&self, cmd: RaftCmdRequest) -> Result<WriteResponse> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.propose(
            cmd,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await.unwrap_or(Err(Error::StaleCommand))
    }

    /// A linearizable read: the callback gets a snapshot that includes every write
    /// acknowledged before the read began.
    pub fn read_index(&self, header: RaftRequestHeader, cb: ReadCallback<E::Snapshot>) {
        let id = header.region_id;
        match self.ctx.router.try_send(
            id,
            PeerMsg::ReadIndex {
                header: Box::new(header),
                cb,
            },
        ) {
            Ok(()) => {}
            Err(SendError::Full(PeerMsg::ReadIndex { cb, .. })) => cb(Err(Error::ServerIsBusy(
                format!("region {id} has too many pending requests"),
            ))),
            Err(SendError::Closed(PeerMsg::ReadIndex { cb, .. })) => {
                cb(Err(Error::RegionNotFound(id)))
            }
            Err(_) => {}
        }
    }

    /// A linearizable read: within the leader's lease at once, from this store's applied
    /// state; otherwise through a ReadIndex round (which also renews the lease).
    pub async fn read_async(
        &self,
        header: RaftRequestHeader,
    ) -> Result<RegionSnapshot<E::Snapshot>> {
        if let Some(snap) = self.lease_read(&header) {
            self.ctx.metrics.on_read(true);
            return Ok(snap);
        }
        self.ctx.metrics.on_read(false);
        self.read_index_async(header).await
    }

    /// A snapshot served under the leader lease, or `None` (no valid lease, not the leader, not
    /// ready, or the request's epoch does not match: the ReadIndex path answers those).
    ///
    /// The snapshot is taken *before* the lease is checked: a lease valid at the check means no
    /// other leader has been elected and no split or membership change was under way up to
    /// then, so the state taken just before holds every write acknowledged before the read
    /// began (writes are acknowledged once applied here), and only committed ones.
    pub fn lease_read(&self, header: &RaftRequestHeader) -> Option<RegionSnapshot<E::Snapshot>> {
        if let Some(p) = &header.peer {
            if p.store_id != 0 && p.store_id != self.ctx.store_id {
                return None;
            }
        }
        let snap = self.ctx.engine.snapshot();
        let now = Instant::now();
        let (snap, renew) = {
            let meta = self.ctx.meta.lock();
            let d = meta.readers.get(&header.region_id)?;
            if d.term == 0 || !d.leader_ready || !d.lease.is_valid_at(now) {
                return None;
            }
            if util::check_epoch(&d.region, header.region_epoch.as_ref(), true, false).is_err() {
                return None;
            }
            let ahead = self.ctx.cfg.max_leader_lease() / 3;
            (
                RegionSnapshot {
                    snap,
                    region: d.region.clone(),
                    applied_index: 0,
                    term: d.term,
                },
                d.lease.take_renewal(now, ahead),
            )
        };
        if renew {
            // A ReadIndex round in the background renews the lease before it runs out.
            self.read_index(header.clone(), Box::new(|_| {}));
        }
        Some(snap)
    }

    /// A linearizable read through a ReadIndex round (never the lease).
    pub async fn read_index_async(
        &self,
        header: RaftRequestHeader,
    ) -> Result<RegionSnapshot<E::Snapshot>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.read_index(
            header,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await.unwrap_or(Err(Error::StaleCommand))
    }

    /// A snapshot from a leader that has applied its own term's first entry, without a round
    /// of messages. It holds every write committed so far *provided the caller serializes
    /// writes per key through this store* (the transaction layer's latches); linearizable
    /// reads must use [`read_index`](Self::read_index).
    pub fn local_leader_snapshot(
        &self,
        region_id: u64,
        epoch: Option<&metapb::RegionEpoch>,
    ) -> Result<RegionSnapshot<E::Snapshot>> {
        let d = {
            let meta = self.ctx.meta.lock();
            meta.readers.get(&region_id).cloned()
        };
        let Some(d) = d else {
            return Err(if self.ctx.router.mailbox(region_id).is_some() {
                Error::RegionNotInitialized(region_id)
            } else {
                Error::RegionNotFound(region_id)
            });
        };
        if d.term == 0 {
            // A sleeping follower asked for a leader's work wakes its group (cheap when awake).
            let _ = self.ctx.router.try_send(region_id, PeerMsg::Wake);
            return Err(Error::NotLeader {
                region_id,
                leader: d.leader,
            });
        }
        if !d.leader_ready {
            return Err(Error::ServerIsBusy(format!(
                "region {region_id}: new leader catching up"
            )));
        }
        util::check_epoch(&d.region, epoch, true, false)?;
        Ok(RegionSnapshot {
            snap: self.ctx.engine.snapshot(),
            region: d.region.clone(),
            applied_index: 0,
            term: d.term,
        })
    }

    /// The region this store holds for `key`, with the leader it knows of.
    pub fn region_for_key(&self, key: &[u8]) -> Option<(metapb::Region, Option<metapb::Peer>)> {
        let meta = self.ctx.meta.lock();
        let r = meta.region_for_key(key)?.clone();
        let leader = meta.readers.get(&r.id).and_then(|d| d.leader);
        Some((r, leader))
    }

    /// Every region this store hosts (initialized ones), with leadership.
    pub fn regions(&self) -> Vec<(metapb::Region, bool)> {
        let meta = self.ctx.meta.lock();
        meta.regions
            .values()
            .map(|r| {
                (
                    r.clone(),
                    meta.readers.get(&r.id).is_some_and(|d| d.term > 0),
                )
            })
            .collect()
    }

    pub fn region(&self, region_id: u64) -> Option<metapb::Region> {
        self.ctx.meta.lock().regions.get(&region_id).cloned()
    }

    pub fn leader_of(&self, region_id: u64) -> Option<metapb::Peer> {
        self.ctx
            .meta
            .lock()
            .readers
            .get(&region_id)
            .and_then(|d| d.leader)
    }

    pub fn is_leader(&self, region_id: u64) -> bool {
        self.ctx
            .meta
            .lock()
            .readers
            .get(&region_id)
            .is_some_and(|d| d.term > 0)
    }

    pub fn region_count(&self) -> usize {
        self.ctx.router.len()
    }

    pub fn leader_count(&self) -> usize {
        self.ctx.meta.lock().leader_count()
    }

    pub fn awake_count(&self) -> usize {
        self.ctx.awake_count()
    }

    /// Split `region_id` at `keys` (ids come from PD).
    pub fn split(
        &self,
        region_id: u64,
        epoch: metapb::RegionEpoch,
        keys: Vec<Vec<u8>>,
        cb: WriteCallback,
    ) {
        let msg = PeerMsg::Casual(CasualMessage::SplitRegion {
            epoch,
            split_keys: keys,
            cb: Some(cb),
        });
        if let Err(e) = self.ctx.router.force_send(region_id, msg) {
            if let PeerMsg::Casual(CasualMessage::SplitRegion { cb: Some(cb), .. }) = e.into_inner()
            {
                cb(Err(Error::RegionNotFound(region_id)));
            }
        }
    }

    pub async fn split_async(
        &self,
        region_id: u64,
        epoch: metapb::RegionEpoch,
        keys: Vec<Vec<u8>>,
    ) -> Result<WriteResponse> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.split(
            region_id,
            epoch,
            keys,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await.unwrap_or(Err(Error::StaleCommand))
    }

    pub fn send_casual(&self, region_id: u64, msg: CasualMessage) -> bool {
        self.ctx
            .router
            .force_send(region_id, PeerMsg::Casual(msg))
            .is_ok()
    }

    /// The transport lost `store_id`: wake regions with peers there.
    /// The transport could not reach `store_id`.
    pub fn report_unreachable(&self, store_id: u64) {
        if let Some(t) = self.ctx.liveness.unreachable(store_id, Instant::now()) {
            self.ctx.on_liveness(t);
        }
    }

    /// A batch (or keep-alive) arrived from `store_id`.
    pub fn on_store_heard(&self, store_id: u64) {
        if let Some(t) = self.ctx.liveness.heard(store_id, Instant::now()) {
            self.ctx.on_liveness(t);
        }
    }

    pub fn report_peer_unreachable(&self, region_id: u64, to_peer_id: u64) {
        let _ = self
            .ctx
            .router
            .force_send(region_id, PeerMsg::Unreachable { to_peer_id });
    }

    pub fn report_snapshot_status(&self, region_id: u64, to_peer_id: u64, ok: bool) {
        let _ = self
            .ctx
            .router
            .force_send(region_id, PeerMsg::SnapshotStatus { to_peer_id, ok });
        self.ctx
            .metrics
            .on_snapshot(if ok { "sent" } else { "send_failed" });
    }

    pub fn on_snapshot_received(&self) {
        self.ctx.metrics.on_snapshot("received");
    }

    /// Data size of the store's data column families (approximate).
    pub fn used_size(&self) -> u64 {
        DATA_CFS
            .iter()
            .filter_map(|cf| self.ctx.engine.approximate_size_cf(cf, &[], None).ok())
            .sum()
    }
}

// ---------------- bootstrap ----------------

use atoll_proto::raft_serverpb::StoreIdent;

pub fn load_store_ident(engine: &impl KvEngine) -> Result<Option<StoreIdent>> {
    match engine.get_value_cf(CF_RAFT, &atoll_keys::store_ident_key())? {
        Some(v) => Ok(Some(util::decode_msg(&v)?)),
        None => Ok(None),
    }
}

pub fn write_store_ident(engine: &impl KvEngine, ident: &StoreIdent) -> Result<()> {
    let mut wb = engine.write_batch();
    wb.put_cf(
        CF_RAFT,
        &atoll_keys::store_ident_key(),
        &util::encode_msg(ident),
    )?;
    wb.put_cf(
        CF_RAFT,
        &atoll_keys::data_format_key(),
        &atoll_keys::DATA_FORMAT_VERSION.to_be_bytes(),
    )?;
    engine.write(wb, true)?;
    Ok(())
}

/// Refuses a data directory written in another on-disk format than this build's
/// ([`atoll_keys::DATA_FORMAT_VERSION`]), with an error that says what to do.
pub fn check_data_format(engine: &impl KvEngine) -> Result<()> {
    if load_store_ident(engine)?.is_none() {
        return Ok(());
    }
    let found = match engine.get_value_cf(CF_RAFT, &atoll_keys::data_format_key())? {
        Some(v) => match <[u8; 4]>::try_from(v.as_slice()) {
            Ok(b) => u32::from_be_bytes(b),
            Err(_) => return Err(Error::Other("undecodable data format marker".into())),
        },
        None => 0,
    };
    if found != atoll_keys::DATA_FORMAT_VERSION {
        return Err(Error::Other(format!(
            "this data directory is in data format {found}, this build reads format {}: \
             start it with an empty --data-dir (data formats are not converted in place)",
            atoll_keys::DATA_FORMAT_VERSION
        )));
    }
    Ok(())
}

/// Writes a region's initial states (before telling PD about it, or in tests).
pub fn prepare_bootstrap_region(engine: &impl KvEngine, region: &metapb::Region) -> Result<()> {
    let mut wb = engine.write_batch();
    storage::write_initial_states(&mut wb, region)?;
    engine.write(wb, true)?;
    Ok(())
}

/// Undoes [`prepare_bootstrap_region`] (another store bootstrapped the cluster first).
pub fn clear_prepared_bootstrap(engine: &impl KvEngine, region_id: u64) -> Result<()> {
    let mut wb = engine.write_batch();
    storage::delete_raft_state(&mut wb, region_id)?;
    wb.delete_cf(CF_RAFT, &atoll_keys::region_state_key(region_id))?;
    engine.write(wb, true)?;
    Ok(())
}

/// Whether the engine holds any region at all.
pub fn has_regions(engine: &impl KvEngine) -> Result<bool> {
    let (s, e) = atoll_keys::region_state_range();
    let mut any = false;
    engine.scan_cf(CF_RAFT, &s, Some(&e), false, |_, _| {
        any = true;
        Ok(false)
    })?;
    Ok(any)
}
