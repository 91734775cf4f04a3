#![allow(dead_code)] // helpers shared by the unit tests; not every test uses each one
//! In-process support for the raftstore's unit tests: a store context over the memory engine
//! with no thread running (tests drive the pollers' `handle`/`end` by hand), and a transport
//! that records what it is given.

use crate::apply::ApplyFsm;
use crate::batch::BatchSystem;
use crate::fsm_peer::{PeerFsm, RaftPoller};
use crate::msg::PeerMsg;
use crate::snap::SnapManager;
use crate::store::{StoreContext, StoreReceivers};
use crate::transport::Transport;
use crate::Config;
use atoll_engine::memory::MemoryEngine;
use atoll_engine::{KvEngine, Peekable};
use atoll_proto::metapb;
use atoll_proto::raft_serverpb::{RaftMessage, SnapshotMeta};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Keeps every message it is asked to send; counts flushes.
#[derive(Default)]
pub struct RecordingTransport {
    pub sent: Mutex<Vec<RaftMessage>>,
    pub snapshots: Mutex<Vec<(RaftMessage, SnapshotMeta)>>,
    pub flushes: AtomicUsize,
}

impl RecordingTransport {
    pub fn take(&self) -> Vec<RaftMessage> {
        std::mem::take(&mut *self.sent.lock())
    }
}

impl Transport for RecordingTransport {
    fn send(&self, msg: RaftMessage) -> bool {
        self.sent.lock().push(msg);
        true
    }
    fn send_snapshot(&self, msg: RaftMessage, meta: SnapshotMeta) -> bool {
        self.snapshots.lock().push((msg, meta));
        true
    }
    fn flush(&self) {
        self.flushes.fetch_add(1, Ordering::SeqCst);
    }
}

/// A store's shared context with nothing started.
pub struct TestStore {
    pub ctx: Arc<StoreContext<MemoryEngine>>,
    pub trans: Arc<RecordingTransport>,
    pub receivers: StoreReceivers<MemoryEngine>,
    pub poller: RaftPoller<MemoryEngine>,
    _systems: (
        BatchSystem<PeerFsm<MemoryEngine>>,
        BatchSystem<ApplyFsm<MemoryEngine>>,
    ),
    _dir: tempfile::TempDir,
}

pub fn test_config() -> Config {
    Config {
        hibernate_regions: false,
        ..Config::default()
    }
}

impl TestStore {
    pub fn new(store_id: u64) -> Self {
        Self::with_config(store_id, test_config())
    }

    pub fn with_config(store_id: u64, cfg: Config) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let trans = Arc::new(RecordingTransport::default());
        let snap_mgr = SnapManager::new(dir.path().join("snap")).expect("snap dir");
        let (ctx, systems, receivers) =
            StoreContext::build(store_id, cfg, MemoryEngine::new(), trans.clone(), snap_mgr);
        let poller = RaftPoller::new(ctx.clone());
        TestStore {
            ctx,
            trans,
            receivers,
            poller,
            _systems: systems,
            _dir: dir,
        }
    }

    pub fn engine(&self) -> &MemoryEngine {
        &self.ctx.engine
    }

    /// A region with the given `(peer id, store id)` voters, its initial states written and
    /// its range registered, and this store's peer of it (not yet started).
    pub fn create_region(
        &self,
        region_id: u64,
        start: &[u8],
        end: &[u8],
        peers: &[(u64, u64)],
    ) -> Box<PeerFsm<MemoryEngine>> {
        let region = metapb::Region {
            id: region_id,
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            region_epoch: Some(metapb::RegionEpoch {
                conf_ver: 1,
                version: 1,
            }),
            peers: peers
                .iter()
                .map(|(id, store)| metapb::Peer {
                    id: *id,
                    store_id: *store,
                    role: metapb::PeerRole::Voter as i32,
                })
                .collect(),
        };
        crate::store::prepare_bootstrap_region(&self.ctx.engine, &region).expect("bootstrap");
        self.ctx.meta.lock().set_region(&region);
        let me = *crate::util::find_peer(&region, self.ctx.store_id).expect("a peer here");
        PeerFsm::create(&self.ctx, region, me).expect("create peer")
    }

    /// One poll round over `fsm` with `msgs`, as a poller runs it.
    pub fn round(
        &mut self,
        fsm: &mut Box<PeerFsm<MemoryEngine>>,
        msgs: Vec<PeerMsg<MemoryEngine>>,
    ) {
        self.handle(fsm, msgs);
        self.end(fsm);
    }

    /// The first half of a round: messages handled, the ready staged, nothing written.
    pub fn handle(
        &mut self,
        fsm: &mut Box<PeerFsm<MemoryEngine>>,
        msgs: Vec<PeerMsg<MemoryEngine>>,
    ) {
        use crate::batch::PollHandler;
        self.poller.begin(1);
        let mut q: VecDeque<_> = msgs.into();
        self.poller.handle(fsm, &mut q);
    }

    /// The second half: the round's write, then what depends on it.
    pub fn end(&mut self, fsm: &mut Box<PeerFsm<MemoryEngine>>) {
        use crate::batch::PollHandler;
        let batch = std::slice::from_mut(fsm);
        self.poller.end(batch);
    }

    /// Whether the engine holds `cf`/`key`.
    pub fn has(&self, cf: &str, key: &[u8]) -> bool {
        self.ctx
            .engine
            .get_value_cf(cf, key)
            .expect("read")
            .is_some()
    }

    pub fn put(&self, cf: &str, key: &[u8], value: &[u8]) {
        use atoll_engine::WriteBatch;
        let mut wb = self.ctx.engine.write_batch();
        wb.put_cf(cf, key, value).expect("put");
        self.ctx.engine.write(wb, false).expect("write");
    }
}
