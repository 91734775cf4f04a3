//! etcd's v3 API on a storage node: the gRPC services etcd clients speak (etcdctl and every
//! etcd client library) and etcd's HTTP/JSON gateway, both on the store's own port. See
//! `docs/etcd.md` for what is served and every difference from etcd.
//!
//! | module | owns |
//! | --- | --- |
//! | [`context`] | [`EtcdContext`]: store id, PD, the user client KV requests go through, this store's local figures ([`LocalStore`]) |
//! | [`header`] | `ResponseHeader`: cluster id = PD's, member id = store id, revision = a PD timestamp, raft term |
//! | [`errors`] | etcd's errors (`rpctypes`), exact codes and messages |
//! | [`kv`] | the KV service (Range, Put, DeleteRange, Txn, Compact) |
//! | [`cluster`] | the Cluster service: members are the Up stores |
//! | [`maintenance`] | the Maintenance service: Status, Alarm, Defragment |
//! | [`election`] | the Election service, and the campaign/wait/resign recipes it shares with Lock, on KV and Watch in process |
//! | [`lock`] | the Lock service: Lock is a campaign with an empty value, Unlock a delete |
//! | [`lease`] | the Lease service: sharded lease records, keep-alives to the owner of each, revoke and expiry in one transaction |
//! | [`watch`] | the Watch service: sharded change feeds merged in revision order, shared by watchers of one range |
//! | [`auth`] | the Auth service; users, roles and permissions in the system key space, cached on every store; store-signed tokens; what each call needs |
//! | [`json`] | the gateway's JSON mapping (grpc-gateway v1 conventions) by proto reflection |
//! | [`gateway`] | the HTTP routes: `POST /v3/...`, `GET /version`, `GET /health` |
//! | [`server`] | gRPC and HTTP on one port, routed by content type |
//!
//! Invariants: a message etcd defines is never reworded (clients match errors by message);
//! the gateway calls the same service objects as gRPC, so both answer alike; every service
//! checks its caller ([`auth::AuthStore::authorize`]) before it does anything, and calls
//! between the services in process are marked [`atoll_client::InProcess`] ([`auth::internal`]).
//!
//! Wiring (storage-node): build an [`EtcdContext`], then pass the store's own gRPC services to
//! [`server::routes`] and serve what it returns with `accept_http1(true)`.

pub mod auth;
pub mod cluster;
pub mod context;
pub mod election;
pub mod errors;
pub mod gateway;
pub mod header;
pub mod json;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod server;
pub mod watch;

pub use auth::service::AuthService;
pub use cluster::ClusterService;
pub use context::{DbSize, EtcdContext, LocalStore, RaftStatus, RocksLocalStore};
pub use election::ElectionService;
pub use kv::KvService;
pub use lease::LeaseService;
pub use lock::LockService;
pub use maintenance::MaintenanceService;
pub use server::{routes, EtcdServices};
pub use watch::WatchService;

/// The etcd server version Atoll reports (Status, `/version`). Clients gate features on it.
pub const ETCD_VERSION: &str = "3.5.17";

/// The etcd cluster version Atoll reports (`/version`).
pub const ETCD_CLUSTER_VERSION: &str = "3.5.0";
