//! PD as the tests' [`Storage`] sees it: the mock PD, with a TSO whose clock can be stopped.
//! A stopped clock hands out consecutive logical timestamps of one millisecond, as a real PD
//! does between two updates of its physical time, so that "the next timestamp PD hands out"
//! is known to the test.

use async_trait::async_trait;
use atoll_pd_client::{HeartbeatResponseHandler, PdClient, RegionInfo, Result};
use atoll_proto::{metapb, pdpb};
use atoll_test_cluster::MockPd;
use parking_lot::Mutex;
use std::sync::Arc;

pub(crate) struct TestPd {
    mock: Arc<MockPd>,
    /// With the clock stopped: the next timestamp to hand out.
    stopped: Mutex<Option<u64>>,
}

impl TestPd {
    pub fn new(mock: Arc<MockPd>) -> Self {
        TestPd {
            mock,
            stopped: Mutex::new(None),
        }
    }

    /// Stops the clock: from now on timestamps only count up by one.
    pub async fn stop_clock(&self) {
        let next = self.mock.get_tso().await.expect("tso");
        *self.stopped.lock() = Some(next);
    }
}

#[async_trait]
impl PdClient for TestPd {
    fn cluster_id(&self) -> u64 {
        self.mock.cluster_id()
    }
    async fn is_cluster_bootstrapped(&self) -> Result<bool> {
        self.mock.is_cluster_bootstrapped().await
    }
    async fn bootstrap_cluster(&self, store: metapb::Store, region: metapb::Region) -> Result<()> {
        self.mock.bootstrap_cluster(store, region).await
    }
    async fn alloc_ids(&self, count: u32) -> Result<u64> {
        self.mock.alloc_ids(count).await
    }
    async fn put_store(&self, store: metapb::Store) -> Result<()> {
        self.mock.put_store(store).await
    }
    async fn get_store(&self, store_id: u64) -> Result<metapb::Store> {
        self.mock.get_store(store_id).await
    }
    async fn get_all_stores(&self, exclude_tombstone: bool) -> Result<Vec<pdpb::StoreInfo>> {
        self.mock.get_all_stores(exclude_tombstone).await
    }
    async fn store_heartbeat(&self, s: pdpb::StoreStats) -> Result<pdpb::StoreHeartbeatResponse> {
        self.mock.store_heartbeat(s).await
    }
    async fn delete_store(&self, store_id: u64) -> Result<()> {
        self.mock.delete_store(store_id).await
    }
    async fn region_heartbeat(&self, req: pdpb::RegionHeartbeatRequest) -> Result<()> {
        self.mock.region_heartbeat(req).await
    }
    fn set_heartbeat_handler(&self, handler: HeartbeatResponseHandler) {
        self.mock.set_heartbeat_handler(handler)
    }
    async fn get_region(&self, key: &[u8]) -> Result<RegionInfo> {
        self.mock.get_region(key).await
    }
    async fn get_prev_region(&self, key: &[u8]) -> Result<RegionInfo> {
        self.mock.get_prev_region(key).await
    }
    async fn get_region_by_id(&self, region_id: u64) -> Result<Option<RegionInfo>> {
        self.mock.get_region_by_id(region_id).await
    }
    async fn scan_regions(&self, start: &[u8], end: &[u8], limit: u32) -> Result<Vec<RegionInfo>> {
        self.mock.scan_regions(start, end, limit).await
    }
    async fn ask_batch_split(&self, r: metapb::Region, n: u32) -> Result<Vec<pdpb::SplitId>> {
        self.mock.ask_batch_split(r, n).await
    }
    async fn report_batch_split(&self, regions: Vec<metapb::Region>) -> Result<()> {
        self.mock.report_batch_split(regions).await
    }
    async fn get_tso_block(&self, count: u32) -> Result<u64> {
        if let Some(next) = self.stopped.lock().as_mut() {
            let first = *next;
            *next += count.max(1) as u64;
            return Ok(first);
        }
        self.mock.get_tso_block(count).await
    }
    async fn get_gc_safe_point(&self) -> Result<u64> {
        self.mock.get_gc_safe_point().await
    }
    async fn update_gc_safe_point(&self, safe_point: u64) -> Result<u64> {
        self.mock.update_gc_safe_point(safe_point).await
    }
    async fn get_members(&self) -> Result<pdpb::GetMembersResponse> {
        self.mock.get_members().await
    }
    async fn get_operators(&self) -> Result<Vec<pdpb::OperatorInfo>> {
        self.mock.get_operators().await
    }
}
