//! The placement driver client: the [`PdClient`] trait that stores and user clients program
//! against, and its gRPC implementation [`RpcPdClient`] (several PD addresses, leader discovery,
//! fail-over, a batched TSO stream and the region heartbeat stream).
//!
//! | module | owns |
//! | --- | --- |
//! | this file | the trait, errors, timestamp helpers |
//! | [`rpc`] | [`RpcPdClient`]: connections, leader tracking, retries |
//! | [`tso`] | batching timestamp requests of many callers into one stream request |

pub mod rpc;
pub mod tso;

use async_trait::async_trait;
use atoll_proto::{metapb, pdpb};
use std::time::Duration;

pub use rpc::{RpcPdClient, RpcPdConfig};

#[derive(Debug, thiserror::Error, Clone)]
pub enum Error {
    #[error("PD is not reachable at {addrs}: {reason}")]
    Unreachable { addrs: String, reason: String },
    #[error("PD request timed out after {0:?}")]
    Timeout(Duration),
    #[error("cluster is not bootstrapped")]
    NotBootstrapped,
    #[error("cluster is already bootstrapped")]
    AlreadyBootstrapped,
    #[error("store {0} is tombstone")]
    StoreTombstone(u64),
    #[error("store {0} not found")]
    StoreNotFound(u64),
    #[error("region not found")]
    RegionNotFound,
    #[error("cluster mismatch: {0}")]
    ClusterMismatch(String),
    #[error("invalid request: {0}")]
    InvalidValue(String),
    #[error("PD error: {0}")]
    Other(String),
}

impl Error {
    /// Errors worth retrying against (possibly another) PD member.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unreachable { .. } | Error::Timeout(_) | Error::Other(_)
        )
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Number of bits of a timestamp's logical part.
pub const TSO_LOGICAL_BITS: u32 = 18;

pub fn compose_ts(physical_ms: i64, logical: i64) -> u64 {
    ((physical_ms as u64) << TSO_LOGICAL_BITS) | (logical as u64 & ((1 << TSO_LOGICAL_BITS) - 1))
}

pub fn ts_physical_ms(ts: u64) -> u64 {
    ts >> TSO_LOGICAL_BITS
}

pub fn ts_logical(ts: u64) -> u64 {
    ts & ((1 << TSO_LOGICAL_BITS) - 1)
}

/// A region with the leader PD knows of.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionInfo {
    pub region: metapb::Region,
    pub leader: Option<metapb::Peer>,
}

/// Handles operator steps PD sends back on the region heartbeat stream.
pub type HeartbeatResponseHandler = Box<dyn Fn(pdpb::RegionHeartbeatResponse) + Send + Sync>;

#[async_trait]
pub trait PdClient: Send + Sync + 'static {
    /// The cluster id once known (0 before the first successful contact).
    fn cluster_id(&self) -> u64;

    async fn is_cluster_bootstrapped(&self) -> Result<bool>;
    async fn bootstrap_cluster(&self, store: metapb::Store, region: metapb::Region) -> Result<()>;

    /// `count` consecutive fresh ids; returns the first.
    async fn alloc_ids(&self, count: u32) -> Result<u64>;
    async fn alloc_id(&self) -> Result<u64> {
        self.alloc_ids(1).await
    }

    async fn put_store(&self, store: metapb::Store) -> Result<()>;
    async fn get_store(&self, store_id: u64) -> Result<metapb::Store>;
    async fn get_all_stores(&self, exclude_tombstone: bool) -> Result<Vec<pdpb::StoreInfo>>;
    async fn store_heartbeat(
        &self,
        stats: pdpb::StoreStats,
    ) -> Result<pdpb::StoreHeartbeatResponse>;
    async fn delete_store(&self, store_id: u64) -> Result<()>;

    /// Sends one region heartbeat on the stream; answers arrive at the handler set with
    /// [`set_heartbeat_handler`](Self::set_heartbeat_handler).
    async fn region_heartbeat(&self, req: pdpb::RegionHeartbeatRequest) -> Result<()>;
    fn set_heartbeat_handler(&self, handler: HeartbeatResponseHandler);

    /// The region holding `key`.
    async fn get_region(&self, key: &[u8]) -> Result<RegionInfo>;
    /// The region just before the one starting at `key` (the one whose end is `key`);
    /// with an empty `key`, the last region.
    async fn get_prev_region(&self, key: &[u8]) -> Result<RegionInfo>;
    async fn get_region_by_id(&self, region_id: u64) -> Result<Option<RegionInfo>>;
    /// Regions overlapping `[start, end)` in key order, at most `limit` (0 = all).
    async fn scan_regions(&self, start: &[u8], end: &[u8], limit: u32) -> Result<Vec<RegionInfo>>;

    async fn ask_batch_split(
        &self,
        region: metapb::Region,
        count: u32,
    ) -> Result<Vec<pdpb::SplitId>>;
    async fn report_batch_split(&self, regions: Vec<metapb::Region>) -> Result<()>;

    /// One fresh timestamp (batched with other callers').
    async fn get_tso(&self) -> Result<u64> {
        self.get_tso_block(1).await
    }

    /// `count` consecutive fresh timestamps; returns the first.
    async fn get_tso_block(&self, count: u32) -> Result<u64>;

    /// The largest timestamp this client has received from PD (0 if it does not keep
    /// track): PD hands out only larger ones from now on.
    fn tso_high_water(&self) -> u64 {
        0
    }

    async fn get_gc_safe_point(&self) -> Result<u64>;
    async fn update_gc_safe_point(&self, safe_point: u64) -> Result<u64>;

    async fn get_members(&self) -> Result<pdpb::GetMembersResponse>;
    async fn get_operators(&self) -> Result<Vec<pdpb::OperatorInfo>>;
}
