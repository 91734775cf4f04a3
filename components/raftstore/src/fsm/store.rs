//! The store: wiring of pollers, workers and threads around one engine (the one place they
//! are started and stopped), the store thread that creates peers for regions it learns of
//! from messages, and the single ticker.

use crate::batch::BatchSystem;
use crate::fsm::apply::ApplyFsm;
use crate::fsm::apply_poller::ApplyPoller;
use crate::fsm::context::{StoreContext, StoreReceivers};
use crate::fsm::peer::PeerFsm;
use crate::fsm::raft_poller::RaftPoller;
use crate::msg::{PeerMsg, StoreMsg};
use crate::operation::{hibernation, life};
use crate::router::RaftRouter;
use crate::snap::SnapManager;
use crate::task::{RegionTask, SplitCheckMsg};
use crate::transport::Transport;
use crate::worker::{pd as pd_worker, region as region_worker, split_check};
use crate::{util, Config, Error, Result, StoreId};
use atoll_engine::{KvEngine, CF_RAFT};
use atoll_pd_client::PdClient;
use atoll_proto::pdpb;
use atoll_proto::raft_serverpb::{PeerState, RegionLocalState};
use crossbeam_channel::Receiver;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// What a store needs to start.
pub struct StoreDeps<E: KvEngine> {
    pub store_id: StoreId,
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
            deps.store_id.get(),
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
            region_worker::run_region_worker(c, region_rx)
        }));
        let c = ctx.clone();
        threads.push(spawn("split-check", move || {
            split_check::run_split_checker(c, split_rx)
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
            .spawn(pd_worker::run(ctx.clone(), deps.pd, pd_rx, stats_fn));
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
                life::clean_tombstone(ctx, &region)?;
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
                region_worker::resume_snapshot_apply(ctx, &region)?;
            }
            ctx.meta.lock().set_region(&region);
            life::load_peer(ctx, region, peer)?;
            count += 1;
        }
        Ok(count)
    }

    pub fn router(&self) -> RaftRouter<E> {
        RaftRouter::new(self.ctx.clone())
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
            StoreMsg::RaftMessage(m) => life::maybe_create_peer(&ctx, *m),
            StoreMsg::StoreDown { store_id } => hibernation::wake_followers_of(&ctx, store_id),
            StoreMsg::PeerDestroyed { .. } => life::retry_parked(&ctx),
            StoreMsg::Stop => break,
        }
    }
}
