//! Store id to address.

use async_trait::async_trait;
use atoll_pd_client::PdClient;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[async_trait]
pub trait StoreResolver: Send + Sync + 'static {
    async fn resolve(&self, store_id: u64) -> Result<String, String>;
    /// Forget a cached address (the connection to it failed).
    fn invalidate(&self, _store_id: u64) {}
}

/// Addresses from PD, cached for a minute.
pub struct PdStoreResolver {
    pd: Arc<dyn PdClient>,
    cache: RwLock<HashMap<u64, (String, Instant)>>,
}

impl PdStoreResolver {
    pub fn new(pd: Arc<dyn PdClient>) -> Self {
        PdStoreResolver {
            pd,
            cache: RwLock::new(HashMap::new()),
        }
    }
}

#[async_trait]
impl StoreResolver for PdStoreResolver {
    async fn resolve(&self, store_id: u64) -> Result<String, String> {
        if let Some((a, t)) = self.cache.read().get(&store_id) {
            if t.elapsed() < Duration::from_secs(60) {
                return Ok(a.clone());
            }
        }
        let store = self
            .pd
            .get_store(store_id)
            .await
            .map_err(|e| e.to_string())?;
        if store.state == atoll_proto::metapb::StoreState::Tombstone as i32 {
            return Err(format!("store {store_id} is tombstone"));
        }
        if store.address.is_empty() {
            return Err(format!("store {store_id} has no address"));
        }
        self.cache
            .write()
            .insert(store_id, (store.address.clone(), Instant::now()));
        Ok(store.address)
    }

    fn invalidate(&self, store_id: u64) {
        self.cache.write().remove(&store_id);
    }
}

/// Fixed addresses (tests).
#[derive(Default)]
pub struct StaticResolver {
    pub addrs: RwLock<HashMap<u64, String>>,
}

#[async_trait]
impl StoreResolver for StaticResolver {
    async fn resolve(&self, store_id: u64) -> Result<String, String> {
        self.addrs
            .read()
            .get(&store_id)
            .cloned()
            .ok_or_else(|| format!("store {store_id} unknown"))
    }
}
