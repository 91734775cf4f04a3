//! What every etcd service of a store shares: who this store is, PD, the user client that routes
//! KV requests by key, and this store's local figures ([`LocalStore`]).

use atoll_client::{Client, ClientConfig};
use atoll_engine::{KvEngine, ALL_CFS, DATA_CFS};
use atoll_engine_rocks::RocksEngine;
use atoll_pd_client::PdClient;
use atoll_raftstore::RaftRouter;
use std::path::Path;
use std::sync::Arc;

/// Raft figures over the regions this store hosts (each region is its own raft group, so there
/// is no single term or index as in etcd: these are the largest over the local peers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RaftStatus {
    /// The largest raft term among the local peers (their persisted hard states).
    pub term: u64,
    /// The largest committed index among them.
    pub commit_index: u64,
    /// The largest applied index among them.
    pub applied_index: u64,
}

/// Sizes of the store's database, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DbSize {
    /// On disk: every file of the database (SST files, including those no longer live that
    /// RocksDB has not deleted yet, write-ahead logs, manifest), as etcd's `dbSize` is the size
    /// of its database file.
    pub physical: u64,
    /// In use: the live SST files of every column family and the write-ahead logs (which hold
    /// what is not flushed to SST files yet). At most `physical`.
    pub in_use: u64,
}

/// This store's local state, as the Maintenance service reports it. Implemented over the
/// raftstore and RocksDB by [`RocksLocalStore`]; tests can substitute their own.
pub trait LocalStore: Send + Sync + 'static {
    fn raft_status(&self) -> RaftStatus;
    /// The store id of the leader of the region holding `key`, if this store hosts a peer of
    /// that region and knows its leader.
    fn leader_for_key(&self, key: &[u8]) -> Option<u64>;
    fn db_size(&self) -> DbSize;
    /// Compacts every data column family over its whole key range: drops deleted and
    /// overwritten entries for good and returns their space. Blocks until done (call it from a
    /// blocking thread).
    fn compact_data(&self) -> Result<(), String>;
}

/// [`LocalStore`] over a running raftstore and its RocksDB.
pub struct RocksLocalStore {
    router: RaftRouter<RocksEngine>,
}

impl RocksLocalStore {
    pub fn new(router: RaftRouter<RocksEngine>) -> Self {
        RocksLocalStore { router }
    }
}

impl LocalStore for RocksLocalStore {
    fn raft_status(&self) -> RaftStatus {
        let engine = self.router.engine();
        let mut s = RaftStatus::default();
        for (region, _) in self.router.regions() {
            // A peer destroyed meanwhile has no states any more: skip it.
            if let Ok(Some(r)) = atoll_raftstore::raft::storage::load_raft_state(engine, region.id)
            {
                s.term = s.term.max(r.term);
                s.commit_index = s.commit_index.max(r.commit);
            }
            if let Ok(Some(a)) = atoll_raftstore::raft::storage::load_apply_state(engine, region.id)
            {
                s.applied_index = s.applied_index.max(a.applied_index);
                // The hard state on disk may trail what was applied (it is persisted with the
                // next raft round): what was applied was committed.
                s.commit_index = s.commit_index.max(a.applied_index);
            }
        }
        s
    }

    fn leader_for_key(&self, key: &[u8]) -> Option<u64> {
        let (_, leader) = self.router.region_for_key(key)?;
        leader.map(|p| p.store_id).filter(|id| *id != 0)
    }

    fn db_size(&self) -> DbSize {
        let engine = self.router.engine();
        let (files, wal) = dir_sizes(Path::new(engine.path()));
        let live_sst: u64 = ALL_CFS
            .iter()
            .map(|cf| {
                engine
                    .property_int_cf(cf, "rocksdb.live-sst-files-size")
                    .unwrap_or(0)
            })
            .sum();
        DbSize {
            physical: files,
            in_use: (live_sst + wal).min(files),
        }
    }

    fn compact_data(&self) -> Result<(), String> {
        let engine = self.router.engine();
        for cf in DATA_CFS {
            engine
                .compact_range_cf(cf, None, None)
                .map_err(|e| format!("compact column family {cf}: {e}"))?;
        }
        Ok(())
    }
}

/// The bytes of the regular files in `dir`, and of those among them that are RocksDB
/// write-ahead logs (`NNNNNN.log`). Files that vanish meanwhile (compactions delete them) count
/// as nothing.
fn dir_sizes(dir: &Path) -> (u64, u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    let (mut files, mut wal) = (0, 0);
    for e in entries.flatten() {
        let Ok(meta) = e.metadata() else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        files += meta.len();
        if e.file_name().to_string_lossy().ends_with(".log") {
            wal += meta.len();
        }
    }
    (files, wal)
}

/// The shared context of a store's etcd services.
pub struct EtcdContext {
    /// This store's id: the etcd member id in every response header.
    pub store_id: u64,
    /// The address other processes reach this store at (`host:port`, no scheme).
    pub advertise_addr: String,
    pub pd: Arc<dyn PdClient>,
    /// Routes KV requests by key through a region cache (to this store or any other).
    pub client: Arc<Client>,
    pub local: Arc<dyn LocalStore>,
    /// Users, roles and tokens (the cached auth state).
    pub auth: Arc<crate::auth::AuthStore>,
    pub(crate) term: crate::header::TermCache,
    pub(crate) defrag: crate::maintenance::DefragState,
    /// Whether the stores serve their client port over TLS (members' URLs are `https://`).
    client_tls: std::sync::atomic::AtomicBool,
}

impl EtcdContext {
    /// A context whose client shares the store's PD connection.
    pub fn new(
        store_id: u64,
        advertise_addr: String,
        pd: Arc<dyn PdClient>,
        local: Arc<dyn LocalStore>,
    ) -> Arc<EtcdContext> {
        let client = Client::with_pd(ClientConfig::new(vec![]), pd.clone());
        Self::with_client(store_id, advertise_addr, pd, client, local)
    }

    /// A context with a client of the caller's making.
    pub fn with_client(
        store_id: u64,
        advertise_addr: String,
        pd: Arc<dyn PdClient>,
        client: Arc<Client>,
        local: Arc<dyn LocalStore>,
    ) -> Arc<EtcdContext> {
        let auth = crate::auth::AuthStore::new(store_id, client.clone(), pd.clone());
        Arc::new(EtcdContext {
            store_id,
            advertise_addr,
            pd,
            client,
            local,
            auth,
            term: crate::header::TermCache::default(),
            defrag: crate::maintenance::DefragState::default(),
            client_tls: Default::default(),
        })
    }

    /// The stores serve their client port over TLS: MemberList answers `https://` URLs (a
    /// cluster runs with TLS on every store or on none).
    pub fn set_client_tls(&self, on: bool) {
        self.client_tls
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The scheme of the members' URLs.
    pub fn url_scheme(&self) -> &'static str {
        if self.client_tls.load(std::sync::atomic::Ordering::Relaxed) {
            "https"
        } else {
            "http"
        }
    }

    /// The etcd cluster id: PD's cluster id.
    pub fn cluster_id(&self) -> u64 {
        self.pd.cluster_id()
    }
}
