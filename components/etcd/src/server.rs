//! One port for gRPC and HTTP, as etcd serves its client port: a request is gRPC when it comes
//! over HTTP/2 with a content type containing `application/grpc` (etcd's test, in
//! `embed/serve.go`), and goes to the gRPC services; any other request (HTTP/1.1 JSON, curl)
//! goes to the gateway. The server must accept HTTP/1.1 (`Server::accept_http1(true)`).

use crate::auth::service::AuthService;
use crate::cluster::ClusterService;
use crate::context::EtcdContext;
use crate::election::{ElectionService, Recipes};
use crate::gateway;
use crate::kv::KvService;
use crate::lease::LeaseService;
use crate::lock::LockService;
use crate::maintenance::MaintenanceService;
use crate::watch::WatchService;
use atoll_proto::etcdserverpb::auth_server::AuthServer;
use atoll_proto::etcdserverpb::cluster_server::ClusterServer;
use atoll_proto::etcdserverpb::kv_server::KvServer;
use atoll_proto::etcdserverpb::lease_server::LeaseServer;
use atoll_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use atoll_proto::etcdserverpb::watch_server::WatchServer;
use atoll_proto::v3electionpb::election_server::ElectionServer;
use atoll_proto::v3lockpb::lock_server::LockServer;
use axum::extract::Request;
use axum::http::{header, Version};
use std::sync::Arc;
use tonic::service::{Routes, RoutesBuilder};
use tower::ServiceExt;

/// The largest gRPC message the etcd services read or write. Requests are held to etcd's
/// limits by the services themselves (`etcdserver: request is too large`), which a transport
/// limit would pre-empt with a bare gRPC error.
pub const MAX_GRPC_MESSAGE: usize = 64 << 20;

/// The etcd services of a store, shared by the gRPC server and the gateway.
#[derive(Clone)]
pub struct EtcdServices {
    pub kv: Arc<KvService>,
    pub cluster: Arc<ClusterService>,
    pub maintenance: Arc<MaintenanceService>,
    pub watch: Arc<WatchService>,
    pub election: Arc<ElectionService>,
    pub lock: Arc<LockService>,
    pub lease: Arc<LeaseService>,
    pub auth: Arc<AuthService>,
}

impl EtcdServices {
    pub fn new(ctx: &Arc<EtcdContext>) -> Self {
        let kv = Arc::new(KvService::new(ctx.clone()));
        let watch = Arc::new(WatchService::new(ctx.clone()));
        let lease = Arc::new(LeaseService::new(ctx.clone()));
        // Election and Lock run on the KV, Watch and Lease services in process.
        let recipes = Arc::new(Recipes {
            kv: kv.clone(),
            watch: watch.clone(),
            grant: Some(crate::election::grant_through(lease.clone())),
        });
        EtcdServices {
            kv,
            cluster: Arc::new(ClusterService::new(ctx.clone())),
            maintenance: Arc::new(MaintenanceService::new(ctx.clone())),
            watch,
            election: Arc::new(ElectionService::new(ctx.clone(), recipes.clone())),
            lock: Arc::new(LockService::new(recipes, ctx.auth.clone())),
            lease,
            auth: Arc::new(AuthService::new(ctx.clone())),
        }
    }

    /// Adds the gRPC services to `grpc`.
    pub fn add_grpc(&self, grpc: &mut RoutesBuilder) {
        grpc.add_service(
            KvServer::from_arc(self.kv.clone())
                .max_decoding_message_size(MAX_GRPC_MESSAGE)
                .max_encoding_message_size(MAX_GRPC_MESSAGE),
        )
        .add_service(ClusterServer::from_arc(self.cluster.clone()))
        .add_service(MaintenanceServer::from_arc(self.maintenance.clone()))
        .add_service(LeaseServer::from_arc(self.lease.clone()))
        .add_service(
            WatchServer::from_arc(self.watch.clone())
                .max_decoding_message_size(MAX_GRPC_MESSAGE)
                .max_encoding_message_size(MAX_GRPC_MESSAGE),
        )
        .add_service(ElectionServer::from_arc(self.election.clone()))
        .add_service(LockServer::from_arc(self.lock.clone()))
        .add_service(AuthServer::from_arc(self.auth.clone()));
    }

    /// The HTTP/JSON gateway over these services.
    pub fn gateway(&self) -> axum::Router {
        gateway::router(
            self.kv.clone(),
            self.cluster.clone(),
            self.maintenance.clone(),
            self.watch.clone(),
            self.lease.clone(),
        )
        .merge(gateway::election_routes(
            self.election.clone(),
            self.lock.clone(),
        ))
        .merge(gateway::auth_routes(self.auth.clone()))
    }
}

/// A store's client port: the gRPC services already in `grpc` (the store's own), etcd's gRPC
/// services, and etcd's gateway for everything that is not gRPC. Serve the result with
/// `Server::builder().accept_http1(true).add_routes(..)`.
pub fn routes(ctx: &Arc<EtcdContext>, mut grpc: RoutesBuilder) -> Routes {
    let services = EtcdServices::new(ctx);
    services.add_grpc(&mut grpc);
    one_port(grpc.routes(), services.gateway())
}

/// Whether a request is gRPC (etcd's `grpcHandlerFunc` test).
pub fn is_grpc(req: &Request) -> bool {
    req.version() == Version::HTTP_2
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.contains("application/grpc"))
}

/// Routes gRPC requests to `grpc` and all others to `http`.
pub fn one_port(grpc: Routes, http: axum::Router) -> Routes {
    let grpc = grpc.prepare().into_axum_router();
    let switch = tower::service_fn(move |req: Request| {
        let to = if is_grpc(&req) {
            grpc.clone()
        } else {
            http.clone()
        };
        to.oneshot(req)
    });
    Routes::from(axum::Router::new().fallback_service(switch))
}
