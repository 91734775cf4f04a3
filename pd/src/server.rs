//! Wiring of a PD member: its engine, raft group, peer transport, gRPC services, scheduling
//! loop and status server. [`PdServer::start`] returns once the ports are bound.

use crate::cluster::Cluster;
use crate::config::{member_id, PdConfig};
use crate::peer::{PdPeerService, PeerTransport};
use crate::raft_node::{RaftNode, RaftNodeConfig};
use crate::service::PdService;
use atoll_engine_rocks::{RocksConfig, RocksEngine};
use atoll_proto::pdpb;
use atoll_proto::pdpb::pd_peer_server::PdPeerServer;
use atoll_proto::pdpb::pd_server::PdServer as GrpcPdServer;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::watch;

pub struct PdServer {
    pub cluster: Arc<Cluster>,
    pub node: Arc<RaftNode>,
    pub client_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    pub status_addr: Option<SocketAddr>,
    stop_tx: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn bind(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("bind {addr}: {e}"))
}

impl PdServer {
    pub async fn start(cfg: PdConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| anyhow::anyhow!("data dir {:?}: {e}", cfg.data_dir))?;
        let engine = RocksEngine::open(
            cfg.data_dir.join("db"),
            &RocksConfig {
                block_cache_size: 64 << 20,
                write_buffer_size: 16 << 20,
                raft_write_buffer_size: 16 << 20,
                ..RocksConfig::default()
            },
        )?;
        let members = cfg.members()?;
        let my_id = member_id(&cfg.name);
        let client_l = bind(&cfg.client_addr).await?;
        let peer_l = bind(&cfg.peer_addr).await?;
        let client_addr = client_l.local_addr()?;
        let peer_addr = peer_l.local_addr()?;
        let advertise_client = if cfg.advertise_client_addr.is_empty() {
            client_addr.to_string()
        } else {
            cfg.advertise_client_addr.clone()
        };
        let advertise_peer = if cfg.advertise_peer_addr.is_empty() {
            peer_addr.to_string()
        } else {
            cfg.advertise_peer_addr.clone()
        };
        let me = pdpb::Member {
            name: cfg.name.clone(),
            member_id: my_id,
            client_addr: advertise_client,
            peer_addr: advertise_peer,
        };
        let peers = members
            .iter()
            .filter(|m| m.id != my_id)
            .map(|m| (m.id, m.peer_addr.clone()))
            .collect();
        // TLS: the client port (stores and clients), the peer port (members only), the
        // status port, and what this member dials the others with.
        let sec = &cfg.security;
        let tls_err = |e: String| anyhow::anyhow!("TLS: {e}");
        let client_tls = sec.client_port().map_err(tls_err)?;
        let peer_port_tls = sec.peer_port().map_err(tls_err)?;
        let status_tls = sec.status_port().map_err(tls_err)?;
        let peer_tls = sec.peer_client().map_err(tls_err)?;
        let trans = PeerTransport::new(
            me.clone(),
            peers,
            tokio::runtime::Handle::current(),
            peer_tls,
        );
        let node = RaftNode::start(
            RaftNodeConfig {
                id: my_id,
                voters: members.iter().map(|m| m.id).collect(),
                tick: cfg.raft.tick_interval.0,
                election_ticks: cfg.raft.election_ticks,
                heartbeat_ticks: cfg.raft.heartbeat_ticks,
                log_compact_threshold: cfg.raft.log_compact_threshold,
            },
            engine,
            trans,
        )
        .map_err(|e| anyhow::anyhow!("start PD raft: {e}"))?;
        let cluster = Cluster::new(node.clone(), cfg.clone(), me);
        let cluster_cell = Arc::new(OnceLock::new());
        let _ = cluster_cell.set(cluster.clone());
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = vec![];

        let mut rx = stop_rx.clone();
        let pd_svc = GrpcPdServer::new(PdService {
            cluster: cluster.clone(),
            members_only: sec.members_only(),
        })
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
        tasks.push(tokio::spawn(async move {
            let router = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(pd_svc);
            let r = atoll_util::tls::serve(router, client_l, client_tls, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "PD client server stopped");
            }
        }));
        let mut rx = stop_rx.clone();
        let peer_svc = PdPeerServer::new(PdPeerService {
            node: node.clone(),
            cluster: cluster_cell,
        })
        .max_decoding_message_size(512 << 20)
        .max_encoding_message_size(512 << 20);
        tasks.push(tokio::spawn(async move {
            let router = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(peer_svc);
            let r = atoll_util::tls::serve(router, peer_l, peer_port_tls, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "PD peer server stopped");
            }
        }));
        tasks.push(tokio::spawn(cluster.clone().run_persister(stop_rx.clone())));
        let c = cluster.clone();
        let interval = cfg.schedule.schedule_interval.0;
        let gc = cfg.gc.clone();
        let mut rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut last_epoch = 0;
            let mut t = tokio::time::interval(interval.min(Duration::from_millis(200)));
            let mut last_tick = std::time::Instant::now();
            let mut last_gc = std::time::Instant::now();
            loop {
                tokio::select! {
                    _ = t.tick() => {}
                    _ = rx.changed() => return,
                }
                if !c.is_leader() {
                    continue;
                }
                let epoch = c
                    .node
                    .status
                    .leader_epoch
                    .load(std::sync::atomic::Ordering::Acquire);
                if epoch != last_epoch && c.on_leader().await.is_ok() {
                    last_epoch = epoch;
                    tracing::info!(name = %c.self_member.name, "this member leads PD");
                }
                if last_tick.elapsed() >= interval {
                    last_tick = std::time::Instant::now();
                    c.tick().await;
                }
                if !gc.life_time.0.is_zero() && last_gc.elapsed() >= gc.run_interval.0 {
                    last_gc = std::time::Instant::now();
                    if let Err(e) = c.advance_gc_safe_point(gc.life_time.0).await {
                        tracing::warn!(error = %e, "cannot advance the GC safe point");
                    }
                }
            }
        }));
        let status_addr = if cfg.status_addr.is_empty() {
            None
        } else {
            let c = cluster.clone();
            let status: atoll_util::status::StatusFn = Arc::new(move || {
                let st = c.node.state.read();
                serde_json::json!({
                    "name": c.self_member.name,
                    "member_id": c.self_member.member_id,
                    "is_leader": c.is_leader(),
                    "leader": c.leader_member().map(|m| m.name),
                    "term": c.node.status.term.load(std::sync::atomic::Ordering::Relaxed),
                    "cluster_id": st.cluster_id,
                    "bootstrapped": st.bootstrapped,
                    "stores": st.stores.len(),
                    "regions": st.regions.len(),
                    "applied_index": st.applied_index,
                })
            });
            let mut rx = stop_rx.clone();
            let addr: SocketAddr = atoll_util::status::resolve(&cfg.status_addr)
                .await
                .map_err(|e| anyhow::anyhow!("status-addr {}: {e}", cfg.status_addr))?;
            Some(
                atoll_util::status::spawn(addr, status, status_tls, async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await?,
            )
        };
        tracing::info!(name = %cfg.name, %client_addr, %peer_addr, "PD member started");
        Ok(PdServer {
            cluster,
            node,
            client_addr,
            peer_addr,
            status_addr,
            stop_tx,
            tasks,
        })
    }

    pub fn is_leader(&self) -> bool {
        self.cluster.is_leader()
    }

    /// Stops serving and the raft group.
    pub async fn stop(self) {
        // Leave the raft group first so that the others elect a new leader at once, then
        // close the servers.
        let node = self.node.clone();
        let _ = tokio::task::spawn_blocking(move || node.stop()).await;
        let _ = self.stop_tx.send(true);
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(1), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

/// Runs a PD member until `shutdown` completes.
pub async fn run(
    cfg: PdConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let server = PdServer::start(cfg).await?;
    shutdown.await;
    tracing::info!("PD member shutting down");
    server.stop().await;
    Ok(())
}
