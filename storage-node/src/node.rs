//! Bringing a store up and down: engine, store identity, cluster bootstrap, PD registration,
//! raftstore, transport, gRPC and status servers, graceful shutdown. The gRPC port also serves
//! etcd's API and its HTTP/JSON gateway (`atoll-etcd`).

use crate::config::NodeConfig;
use crate::service::KvService;
use atoll_engine_rocks::{RocksConfig, RocksEngine};
use atoll_pd_client::{PdClient, RpcPdClient, RpcPdConfig};
use atoll_proto::kvrpcpb::kv_server::KvServer;
use atoll_proto::raft_serverpb::raft_server::RaftServer;
use atoll_proto::raft_serverpb::StoreIdent;
use atoll_proto::{metapb, pdpb};
use atoll_raftstore::bootstrap::{
    check_data_format, clear_prepared_bootstrap, has_regions, load_store_ident,
    prepare_bootstrap_region, write_store_ident,
};
use atoll_raftstore::snap::SnapManager;
use atoll_raftstore::{RaftRouter, RaftStore, StoreDeps};
use atoll_storage::Storage;
use atoll_transport::{GrpcTransport, PdStoreResolver, RaftService, TransportConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub type Engine = RocksEngine;

/// A running store.
pub struct Node {
    pub store_id: u64,
    pub addr: SocketAddr,
    pub status_addr: Option<SocketAddr>,
    pub router: RaftRouter<Engine>,
    pub storage: Arc<Storage<Engine>>,
    pub pd: Arc<dyn PdClient>,
    store: Option<RaftStore<Engine>>,
    transport: GrpcTransport,
    stop_tx: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn connect_pd(
    cfg: &NodeConfig,
    tls: Option<atoll_util::tls::ClientTls>,
    patience: Duration,
) -> anyhow::Result<RpcPdClient> {
    let deadline = Instant::now() + patience;
    let mut pd_cfg = RpcPdConfig::new(cfg.pd_endpoints());
    pd_cfg.tls = tls;
    loop {
        match RpcPdClient::connect(pd_cfg.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "PD not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(anyhow::anyhow!("cannot reach PD at {}: {e}", cfg.pd)),
        }
    }
}

/// The store's Ed25519 signing key from `<data-dir>/auth-key` (32 bytes, mode 0600), made on
/// first start.
fn load_auth_key(dir: &std::path::Path) -> anyhow::Result<atoll_etcd::auth::token::SigningKey> {
    let path = dir.join("auth-key");
    match std::fs::read(&path) {
        Ok(b) => {
            let bytes: [u8; 32] = b.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!("{}: not a 32-byte key ({} bytes)", path.display(), b.len())
            })?;
            Ok(atoll_etcd::auth::token::SigningKey::from_bytes(&bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = atoll_etcd::auth::token::new_key();
            let tmp = dir.join("auth-key.tmp");
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
                f.write_all(&key.to_bytes())?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

/// Store id from disk, or a fresh one from PD.
async fn store_identity(engine: &Engine, pd: &dyn PdClient) -> anyhow::Result<u64> {
    let cluster_id = pd.cluster_id();
    check_data_format(engine)?;
    if let Some(ident) = load_store_ident(engine)? {
        if cluster_id != 0 && ident.cluster_id != 0 && ident.cluster_id != cluster_id {
            anyhow::bail!(
                "this data directory belongs to cluster {} but PD runs cluster {cluster_id}: refusing to start",
                ident.cluster_id
            );
        }
        return Ok(ident.store_id);
    }
    if has_regions(engine)? {
        anyhow::bail!("data directory holds regions but no store identity: it is damaged");
    }
    let store_id = pd.alloc_id().await?;
    write_store_ident(
        engine,
        &StoreIdent {
            cluster_id,
            store_id,
        },
    )?;
    tracing::info!(store_id, "new store id");
    Ok(store_id)
}

async fn maybe_bootstrap(
    engine: &Engine,
    pd: &dyn PdClient,
    store: &metapb::Store,
) -> anyhow::Result<()> {
    if pd.is_cluster_bootstrapped().await? {
        return Ok(());
    }
    if has_regions(engine)? {
        anyhow::bail!("PD says the cluster is not bootstrapped, but this store has regions: PD's data was lost");
    }
    let region_id = pd.alloc_id().await?;
    let peer_id = pd.alloc_id().await?;
    let region = metapb::Region {
        id: region_id,
        start_key: vec![],
        end_key: vec![],
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: 1,
            version: 1,
        }),
        peers: vec![metapb::Peer {
            id: peer_id,
            store_id: store.id,
            role: 0,
        }],
    };
    prepare_bootstrap_region(engine, &region)?;
    match pd.bootstrap_cluster(store.clone(), region).await {
        Ok(()) => {
            tracing::info!(store_id = store.id, region_id, "bootstrapped the cluster");
            Ok(())
        }
        Err(atoll_pd_client::Error::AlreadyBootstrapped) => {
            clear_prepared_bootstrap(engine, region_id)?;
            Ok(())
        }
        Err(e) => {
            clear_prepared_bootstrap(engine, region_id)?;
            Err(e.into())
        }
    }
}

impl Node {
    pub async fn start(cfg: NodeConfig) -> anyhow::Result<Node> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| anyhow::anyhow!("data dir {:?}: {e}", cfg.data_dir))?;
        let engine = RocksEngine::open(
            cfg.data_dir.join("db"),
            &RocksConfig {
                block_cache_size: cfg.rocksdb.block_cache_size.0 as usize,
                write_buffer_size: cfg.rocksdb.write_buffer_size.0 as usize,
                max_background_jobs: cfg.rocksdb.max_background_jobs,
                ..RocksConfig::default()
            },
        )?;
        let snap_mgr = SnapManager::new(cfg.data_dir.join("snap"))?;
        // TLS: what this store serves on its port and its status port, and what it dials
        // other stores and PD with (files re-read when they change).
        let sec = &cfg.security;
        let server_tls = sec.client_port().map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
        let status_tls = sec.status_port().map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
        let peer_tls = sec.peer_client().map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
        let pd: Arc<dyn PdClient> =
            Arc::new(connect_pd(&cfg, peer_tls.clone(), Duration::from_secs(60)).await?);
        let store_id = store_identity(&engine, pd.as_ref()).await?;
        let listener = tokio::net::TcpListener::bind(&cfg.addr)
            .await
            .map_err(|e| anyhow::anyhow!("bind {}: {e}", cfg.addr))?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = vec![];
        let started = (atoll_util::unix_millis() / 1000) as i64;
        let mut meta = metapb::Store {
            id: store_id,
            address: cfg.advertise(&addr),
            status_address: String::new(),
            state: metapb::StoreState::Up as i32,
            version: env!("CARGO_PKG_VERSION").into(),
            start_timestamp: started,
            last_heartbeat_ms: 0,
            auth_key: vec![],
        };
        // The key this store signs auth tokens with; its public half goes to PD with the
        // store record, where every other store finds it.
        let auth_key = load_auth_key(&cfg.data_dir)?;
        meta.auth_key = auth_key.verifying_key().to_bytes().to_vec();
        // The first region must be on disk before the raftstore loads its regions.
        maybe_bootstrap(&engine, pd.as_ref(), &meta).await?;

        let transport = GrpcTransport::new(
            store_id,
            TransportConfig {
                snap_chunk_size: cfg.raftstore.snap_chunk_size.0 as usize,
                snap_send_limit: cfg.raftstore.concurrent_send_snap_limit,
                tls: peer_tls.clone(),
                ..TransportConfig::default()
            },
            Arc::new(PdStoreResolver::new(pd.clone())),
            tokio::runtime::Handle::current(),
        );
        let data_dir = cfg.data_dir.clone();
        let stats = Arc::new(move || {
            let (capacity, available) = atoll_util::sys::disk_space(&data_dir).unwrap_or((0, 0));
            pdpb::StoreStats {
                capacity,
                available,
                start_time: started,
                ..Default::default()
            }
        });
        let store = RaftStore::start(StoreDeps {
            store_id: atoll_raftstore::StoreId(store_id),
            cfg: cfg.raftstore.clone(),
            engine: engine.clone(),
            trans: Arc::new(transport.clone()),
            pd: pd.clone(),
            snap_mgr,
            runtime: tokio::runtime::Handle::current(),
            stats,
        })?;
        let router = store.router();
        transport.set_sink(Arc::new(router.clone()));
        let storage = Arc::new(Storage::new(
            router.clone(),
            pd.clone(),
            cfg.storage.clone(),
        ));
        tasks.push(tokio::spawn(
            storage.clone().run_background(stop_rx.clone()),
        ));
        tasks.push(tokio::spawn(
            storage.clone().run_lease_timers(stop_rx.clone()),
        ));

        // One port, as etcd's: Atoll's own services, etcd's gRPC services and etcd's HTTP/JSON
        // gateway (HTTP/1.1 requests and non-gRPC HTTP/2 requests).
        let etcd = atoll_etcd::EtcdContext::new(
            store_id,
            cfg.advertise(&addr),
            pd.clone(),
            Arc::new(atoll_etcd::RocksLocalStore::new(router.clone())),
        );
        etcd.set_client_tls(server_tls.is_some());
        etcd.auth.set_key(auth_key);
        etcd.auth
            .set_token_ttl(Duration::from_secs(cfg.auth_token_ttl.max(1)));
        etcd.auth.set_cache_ttl(cfg.auth_cache_ttl.0);
        // The etcd layer checked its caller already: its calls to other stores carry this
        // store's token (calls to this store are marked in process).
        let auth = etcd.auth.clone();
        let token: Arc<dyn Fn() -> Option<String> + Send + Sync> =
            Arc::new(move || Some(auth.store_token()));
        etcd.client.set_token_source(Some(token));
        let kv = KvServer::new(KvService::new(storage.clone(), etcd.auth.clone()))
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        // Raft messages and snapshots only from cluster members when TLS is on.
        let raft = tonic::service::interceptor::InterceptedService::new(
            RaftServer::new(RaftService::new(
                Arc::new(router.clone()),
                cfg.raftstore.concurrent_recv_snap_limit,
            ))
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20),
            atoll_util::tls::members_only(sec.members_only()),
        );
        // The etcd layer's requests for regions this store leads go straight to its own KV
        // service, not through a socket to itself.
        etcd.client.serve_locally(&cfg.advertise(&addr), kv.clone());
        etcd.client.set_tls(peer_tls.clone());
        // Expired leases of the lease records this store leads are revoked from here.
        tasks.push(tokio::spawn(atoll_etcd::lease::run_expiry(
            etcd.clone(),
            storage.lease_table().clone(),
            stop_rx.clone(),
        )));
        let status_addr = if cfg.status_addr.is_empty() {
            None
        } else {
            let r = router.clone();
            let s = storage.clone();
            let e = engine.clone();
            let status: atoll_util::status::StatusFn = Arc::new(move || {
                let engine: serde_json::Map<String, serde_json::Value> = e
                    .stats()
                    .into_iter()
                    .map(|(cf, props)| {
                        (
                            cf,
                            serde_json::Value::Object(
                                props.into_iter().map(|(k, v)| (k, v.into())).collect(),
                            ),
                        )
                    })
                    .collect();
                serde_json::json!({
                    "engine": engine,
                    "store_id": r.store_id().get(),
                    "regions": r.region_count(),
                    "leaders": r.leader_count(),
                    "awake_regions": r.awake_count(),
                    "synced_write_batches": r.metrics().synced_write_batches(),
                    "max_ts": s.max_ts(),
                })
            });
            let mut rx = stop_rx.clone();
            let a: SocketAddr = atoll_util::status::resolve(&cfg.status_addr)
                .await
                .map_err(|e| anyhow::anyhow!("status-addr {}: {e}", cfg.status_addr))?;
            Some(
                atoll_util::status::spawn(a, status, status_tls, async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await?,
            )
        };

        meta.status_address = if !cfg.advertise_status_addr.is_empty() {
            cfg.advertise_status_addr.clone()
        } else {
            status_addr.map(|a| cfg.advertise(&a)).unwrap_or_default()
        };
        pd.put_store(meta.clone())
            .await
            .map_err(|e| anyhow::anyhow!("register store {store_id} with PD: {e}"))?;
        // Served only once registered: other stores check this store's tokens with the key
        // in its PD record, so its first calls (the auth state read) must find it there.
        let mut grpc = tonic::service::RoutesBuilder::default();
        grpc.add_service(kv).add_service(raft);
        let routes = atoll_etcd::routes(&etcd, grpc);
        let mut rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let router = tonic::transport::Server::builder()
                .accept_http1(true)
                .tcp_nodelay(true)
                .initial_stream_window_size(4 << 20)
                .initial_connection_window_size(16 << 20)
                .add_routes(routes);
            let r = atoll_util::tls::serve(router, listener, server_tls, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        }));

        tasks.push(tokio::spawn(etcd.auth.clone().load(stop_rx.clone())));
        tracing::info!(store_id, %addr, "store started");
        Ok(Node {
            store_id,
            addr,
            status_addr,
            router,
            storage,
            pd,
            store: Some(store),
            transport,
            stop_tx,
            tasks,
        })
    }

    /// Stops serving, then stops the raftstore (nothing acknowledged is lost: it is in the log).
    pub async fn stop(mut self) {
        let _ = self.stop_tx.send(true);
        // Other stores keep their raft streams open: give in-flight requests a moment, then
        // stop waiting for them.
        for t in self.tasks.drain(..) {
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(1), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        self.transport.close();
        if let Some(store) = self.store.take() {
            let _ = tokio::task::spawn_blocking(move || store.shutdown()).await;
        }
    }
}

/// Runs a store until `shutdown` completes.
pub async fn run(
    cfg: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let node = Node::start(cfg).await?;
    shutdown.await;
    tracing::info!(store_id = node.store_id, "shutting down");
    node.stop().await;
    Ok(())
}
