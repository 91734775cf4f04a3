//! Raftstore configuration (the `[raftstore]` table of the storage node's TOML).

use atoll_util::config::{ReadableDuration, ReadableSize};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// One raft tick. Election and heartbeat timeouts are counted in ticks.
    pub raft_base_tick_interval: ReadableDuration,
    pub raft_election_timeout_ticks: usize,
    pub raft_heartbeat_ticks: usize,
    /// How long after a quorum acknowledged it a leader may serve reads from its own state
    /// without a ReadIndex round ("0s" disables lease reads; unset = half the election
    /// timeout). Must stay below `(raft-election-timeout-ticks - 2) * raft-base-tick-interval`:
    /// no other peer can be elected sooner than that (docs/design/write-path.md, "Reads").
    pub raft_max_leader_lease: Option<ReadableDuration>,
    pub raft_max_size_per_msg: ReadableSize,
    pub raft_max_inflight_msgs: usize,
    /// Largest proposal accepted (a bigger one is answered `RaftEntryTooLarge`).
    pub raft_entry_max_size: ReadableSize,

    /// Check whether the raft log can be compacted every this many ticks.
    pub raft_log_gc_tick_ticks: usize,
    /// Compact once this many entries are replicated to every peer and applied.
    pub raft_log_gc_threshold: u64,
    /// Compact even if a follower lags (it will need a snapshot) past this many entries...
    pub raft_log_gc_count_limit: u64,
    /// ...or past this many bytes of log.
    pub raft_log_gc_size_limit: ReadableSize,

    /// Split a region once its data passes this size...
    pub region_split_size: ReadableSize,
    /// ...or this many keys.
    pub region_split_keys: u64,
    /// Re-scan a region's size once this much has been written to it since the last scan.
    pub region_split_check_diff: ReadableSize,

    /// Poller threads driving raft (the fsync per round happens here). 0 = one per four
    /// cores (at least 1, at most 4): fewer, fuller rounds are cheaper on small machines.
    pub store_pool_size: usize,
    /// Poller threads applying committed entries.
    pub apply_pool_size: usize,
    /// Most regions one poller round handles.
    pub max_batch_size: usize,
    /// Messages a region's mailbox holds before proposals get `ServerIsBusy`.
    pub mailbox_capacity: usize,

    /// Let idle regions stop ticking.
    pub hibernate_regions: bool,
    /// Ticks a leader must be idle before its region hibernates.
    pub hibernate_after_ticks: usize,

    /// How often leaders check whether their region changed since they last reported it to
    /// PD (leader, epoch, peers, down or pending peers, size, keys, written bytes beyond a
    /// threshold) and report it if so. Leadership, split and membership changes are reported
    /// at once, whatever this says.
    pub pd_heartbeat_interval: ReadableDuration,
    /// A leader whose region did not change reports it anyway after this long.
    pub pd_heartbeat_max_interval: ReadableDuration,
    /// How often the store reports itself to PD.
    pub pd_store_heartbeat_interval: ReadableDuration,
    /// A peer not heard from this long counts as down in region heartbeats.
    pub max_peer_down_duration: ReadableDuration,
    /// A store not heard from this long (no message, no keep-alive) is taken as down: its
    /// peers no longer keep regions awake, and sleeping leaders report them down to PD. The
    /// transport sends a keep-alive on every idle connection each second.
    pub store_liveness_timeout: ReadableDuration,
    /// A follower without a leader this long asks PD whether it is still a member.
    pub abnormal_leader_missing_duration: ReadableDuration,

    /// Snapshot data chunk size on the wire.
    pub snap_chunk_size: ReadableSize,
    /// Concurrent snapshot sends and receives per store.
    pub concurrent_send_snap_limit: usize,
    pub concurrent_recv_snap_limit: usize,

    /// Bytes of raft entries kept in memory per region.
    pub raft_entry_cache_size: ReadableSize,
    /// Apply this many bytes at most before writing the apply batch.
    pub apply_batch_size: ReadableSize,
    /// Committed entries a region may have handed to the apply side and not yet applied;
    /// past it, its raft side stops fetching committed entries (they stay in the log) until
    /// apply catches up.
    pub apply_max_pending_size: ReadableSize,
    /// The same bound for the whole store (a region with nothing pending may always fetch).
    pub apply_pending_memory_limit: ReadableSize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            raft_base_tick_interval: ReadableDuration::millis(100),
            raft_election_timeout_ticks: 10,
            raft_heartbeat_ticks: 2,
            raft_max_leader_lease: None,
            raft_max_size_per_msg: ReadableSize::mib(1),
            raft_max_inflight_msgs: 256,
            raft_entry_max_size: ReadableSize::mib(16),
            raft_log_gc_tick_ticks: 30,
            raft_log_gc_threshold: 50,
            raft_log_gc_count_limit: 20_000,
            raft_log_gc_size_limit: ReadableSize::mib(32),
            region_split_size: ReadableSize::mib(96),
            region_split_keys: 960_000,
            region_split_check_diff: ReadableSize::mib(6),
            store_pool_size: 0,
            apply_pool_size: 1,
            max_batch_size: 256,
            mailbox_capacity: 4096,
            hibernate_regions: true,
            hibernate_after_ticks: 20,
            pd_heartbeat_interval: ReadableDuration::secs(10),
            pd_heartbeat_max_interval: ReadableDuration::secs(300),
            pd_store_heartbeat_interval: ReadableDuration::secs(2),
            max_peer_down_duration: ReadableDuration::secs(30),
            store_liveness_timeout: ReadableDuration::secs(3),
            abnormal_leader_missing_duration: ReadableDuration::secs(30),
            snap_chunk_size: ReadableSize::mib(1),
            concurrent_send_snap_limit: 4,
            concurrent_recv_snap_limit: 4,
            raft_entry_cache_size: ReadableSize::mib(4),
            apply_batch_size: ReadableSize::mib(4),
            apply_max_pending_size: ReadableSize::mib(16),
            apply_pending_memory_limit: ReadableSize::mib(256),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("raftstore.{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.raft_base_tick_interval.0 < Duration::from_millis(1) {
            return Err(invalid("raft-base-tick-interval", "must be at least 1ms"));
        }
        if self.raft_heartbeat_ticks == 0 {
            return Err(invalid("raft-heartbeat-ticks", "must be positive"));
        }
        if self.pd_heartbeat_max_interval.0 < self.pd_heartbeat_interval.0 {
            return Err(invalid(
                "pd-heartbeat-max-interval",
                "must be at least pd-heartbeat-interval",
            ));
        }
        if self.raft_election_timeout_ticks <= self.raft_heartbeat_ticks {
            return Err(invalid(
                "raft-election-timeout-ticks",
                "must be larger than raft-heartbeat-ticks",
            ));
        }
        let bound = self.tick() * (self.raft_election_timeout_ticks as u32).saturating_sub(2);
        let lease = self.max_leader_lease();
        if lease >= bound && !lease.is_zero() {
            return Err(invalid(
                "raft-max-leader-lease",
                format!(
                    "must be below (raft-election-timeout-ticks - 2) * raft-base-tick-interval = {bound:?}, or 0"
                ),
            ));
        }
        if self.region_split_size.0 < 1024 {
            return Err(invalid("region-split-size", "must be at least 1KiB"));
        }
        if self.region_split_keys == 0 {
            return Err(invalid("region-split-keys", "must be positive"));
        }
        if self.apply_pool_size == 0 {
            return Err(invalid("store-pool-size", "pool sizes must be positive"));
        }
        if self.max_batch_size == 0 || self.mailbox_capacity == 0 {
            return Err(invalid(
                "max-batch-size",
                "batch size and mailbox capacity must be positive",
            ));
        }
        if self.raft_entry_max_size.0 < 1024 {
            return Err(invalid("raft-entry-max-size", "must be at least 1KiB"));
        }
        if self.apply_max_pending_size.0 == 0 || self.apply_pending_memory_limit.0 == 0 {
            return Err(invalid(
                "apply-max-pending-size",
                "apply-max-pending-size and apply-pending-memory-limit must be positive",
            ));
        }
        if self.store_liveness_timeout.0 < Duration::from_secs(2) {
            return Err(invalid(
                "store-liveness-timeout",
                "must be at least 2s (the transport's keep-alives come every second)",
            ));
        }
        if self.snap_chunk_size.0 == 0 || self.snap_chunk_size.0 > 64 << 20 {
            return Err(invalid("snap-chunk-size", "must be in (0, 64MiB]"));
        }
        Ok(())
    }

    /// The raft poller count to use (resolving 0 = automatic).
    pub fn store_pollers(&self) -> usize {
        if self.store_pool_size > 0 {
            return self.store_pool_size;
        }
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        (cores / 4).clamp(1, 4)
    }

    pub fn tick(&self) -> Duration {
        self.raft_base_tick_interval.0
    }

    /// The leader lease in effect (zero = lease reads off).
    pub fn max_leader_lease(&self) -> Duration {
        match self.raft_max_leader_lease {
            Some(d) => d.0,
            None => self.election_timeout() / 2,
        }
    }

    /// The shortest time in which a follower gives up on its leader.
    pub fn election_timeout(&self) -> Duration {
        self.tick() * self.raft_election_timeout_ticks as u32
    }

    /// Diff that triggers a size re-scan: the configured one, but never more than an eighth
    /// of the split size (so small test regions split promptly).
    pub fn split_check_diff(&self) -> u64 {
        self.region_split_check_diff
            .0
            .min(self.region_split_size.0 / 8)
            .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_parse() {
        Config::default().validate().unwrap();
        let c: Config =
            toml::from_str("region-split-size = \"256KiB\"\nraft-base-tick-interval = \"50ms\"")
                .unwrap();
        assert_eq!(c.region_split_size, ReadableSize::kib(256));
        assert_eq!(c.tick(), Duration::from_millis(50));
        let bad = Config {
            raft_election_timeout_ticks: 1,
            ..Config::default()
        };
        assert!(bad.validate().is_err());
        assert!(toml::from_str::<Config>("no-such-field = 1").is_err());
        // The lease: half the election timeout unless set; never as long as an election.
        assert_eq!(c.max_leader_lease(), Duration::from_millis(250));
        let off: Config = toml::from_str("raft-max-leader-lease = \"0s\"").unwrap();
        assert_eq!(off.max_leader_lease(), Duration::ZERO);
        off.validate().unwrap();
        let unsafe_lease: Config = toml::from_str("raft-max-leader-lease = \"900ms\"").unwrap();
        assert!(unsafe_lease.validate().is_err());
    }
}
