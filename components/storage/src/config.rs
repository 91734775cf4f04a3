//! The storage layer's configuration (the `[storage]` table of the storage node's TOML).

use atoll_util::config::ReadableSize;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct StorageConfig {
    /// Largest key accepted.
    pub max_key_size: ReadableSize,
    /// Largest value accepted.
    pub max_value_size: ReadableSize,
    /// Largest batch (keys x sizes) one request may write.
    pub max_batch_size: ReadableSize,
    /// Latch slots serializing writers per key.
    pub latch_slots: usize,
    /// Requests in flight at once (more are answered ServerIsBusy).
    pub max_inflight_requests: usize,
    /// Test-only: allow `unsafe_local_read` (reads on any peer without ReadIndex).
    pub allow_unsafe_local_read: bool,
    /// How often to check PD's GC safe point and collect old versions.
    pub gc_interval: atoll_util::config::ReadableDuration,
    /// Versions deleted per GC batch (bounded so foreground traffic is not starved).
    pub gc_batch_keys: usize,
    /// An etcd lease not kept alive for this long has its remaining time checkpointed (then
    /// again every interval), so a failover restarts it from there, not from its full TTL
    /// (only leases whose TTL is longer than this). docs/design/leases.md.
    pub lease_checkpoint_interval: atoll_util::config::ReadableDuration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            max_key_size: ReadableSize(atoll_keys::DEFAULT_MAX_KEY_SIZE as u64),
            max_value_size: ReadableSize(atoll_keys::DEFAULT_MAX_VALUE_SIZE as u64),
            max_batch_size: ReadableSize::mib(12),
            latch_slots: 4096,
            max_inflight_requests: 16384,
            allow_unsafe_local_read: false,
            gc_interval: atoll_util::config::ReadableDuration::secs(60),
            gc_batch_keys: 512,
            lease_checkpoint_interval: atoll_util::config::ReadableDuration::secs(60),
        }
    }
}
