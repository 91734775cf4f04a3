//! Raftstore metrics: store-scoped atomics (several stores can share one test process, and
//! tests assert on them), mirrored into the process-wide Prometheus registry.

use atoll_util::metric;
use atoll_util::metrics::{Histogram, IntCounter, IntCounterVec, IntGauge};
use std::sync::atomic::{AtomicU64, Ordering};

metric!(static RAFT_SYNCED_WRITE_BATCHES: IntCounter = int_counter(
    "atoll_raftstore_synced_write_batches_total",
    "Synced write batches of raft state (one per poll round that had anything to persist)"));
metric!(static RAFT_PROPOSALS: IntCounterVec = int_counter_vec(
    "atoll_raftstore_proposals_total", "Proposals by kind", &["kind"]));
metric!(static RAFT_POLL_ROUNDS: IntCounter = int_counter(
    "atoll_raftstore_poll_rounds_total", "Raft poller rounds"));
metric!(static RAFT_READY_REGIONS: IntCounter = int_counter(
    "atoll_raftstore_ready_regions_total", "Regions with a raft ready, summed over rounds"));
metric!(static RAFT_WRITE_DURATION: Histogram = histogram(
    "atoll_raftstore_raft_write_duration_seconds", "Time to write and sync one round's raft batch",
    atoll_util::metrics::latency_buckets()));
metric!(static APPLY_ROUNDS: IntCounter = int_counter(
    "atoll_raftstore_apply_rounds_total", "Apply poller rounds"));
metric!(static APPLIED_ENTRIES: IntCounter = int_counter(
    "atoll_raftstore_applied_entries_total", "Raft entries applied"));
metric!(static MESSAGES_DROPPED: IntCounterVec = int_counter_vec(
    "atoll_raftstore_messages_dropped_total", "Raft messages dropped, by reason", &["reason"]));
metric!(static SNAPSHOTS: IntCounterVec = int_counter_vec(
    "atoll_raftstore_snapshots_total", "Snapshots by stage", &["stage"]));
metric!(static READS: IntCounterVec = int_counter_vec(
    "atoll_raftstore_reads_total",
    "Linearizable reads by how the leader confirmed it still leads: lease or read_index", &["path"]));
metric!(static AWAKE_REGIONS: IntGauge = int_gauge(
    "atoll_raftstore_awake_regions", "Regions that tick (not hibernating)"));
metric!(static REGIONS: IntGauge = int_gauge(
    "atoll_raftstore_regions", "Peers hosted by this store"));
metric!(static APPLY_PENDING: IntGauge = int_gauge(
    "atoll_apply_pending_bytes",
    "Committed entries handed to the apply side and not applied yet (bytes)"));

#[derive(Default, Debug)]
pub struct StoreMetrics {
    pub synced_write_batches: AtomicU64,
    pub poll_rounds: AtomicU64,
    pub ready_regions: AtomicU64,
    pub proposals: AtomicU64,
    pub apply_rounds: AtomicU64,
    pub applied_entries: AtomicU64,
    pub dropped_messages: AtomicU64,
    pub snapshots_generated: AtomicU64,
    pub snapshots_applied: AtomicU64,
    pub snapshots_sent: AtomicU64,
    pub snapshots_received: AtomicU64,
    /// Snapshot generations that failed (each is retried).
    pub snapshots_generate_failed: AtomicU64,
    /// Snapshot applies that failed (each is retried).
    pub snapshots_apply_failed: AtomicU64,
    /// Reads answered within the leader lease (no message round).
    pub lease_reads: AtomicU64,
    /// Reads that went through a ReadIndex round.
    pub read_index_reads: AtomicU64,
}

fn inc(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// One round that handled `n` items: counted here and in Prometheus.
fn on_round(rounds: (&AtomicU64, &IntCounter), items: (&AtomicU64, &IntCounter), n: u64) {
    inc(rounds.0, 1);
    inc(items.0, n);
    rounds.1.inc();
    items.1.inc_by(n);
}

impl StoreMetrics {
    pub fn on_read(&self, lease: bool) {
        if lease {
            inc(&self.lease_reads, 1);
            READS.with_label_values(&["lease"]).inc();
        } else {
            inc(&self.read_index_reads, 1);
            READS.with_label_values(&["read_index"]).inc();
        }
    }

    pub fn on_synced_batch(&self, secs: f64) {
        inc(&self.synced_write_batches, 1);
        RAFT_SYNCED_WRITE_BATCHES.inc();
        RAFT_WRITE_DURATION.observe(secs);
    }
    pub fn on_poll_round(&self, ready_regions: u64) {
        let rounds = (&self.poll_rounds, &*RAFT_POLL_ROUNDS);
        on_round(
            rounds,
            (&self.ready_regions, &*RAFT_READY_REGIONS),
            ready_regions,
        );
    }
    pub fn on_proposal(&self, kind: &str) {
        inc(&self.proposals, 1);
        RAFT_PROPOSALS.with_label_values(&[kind]).inc();
    }
    pub fn on_apply_round(&self, entries: u64) {
        let rounds = (&self.apply_rounds, &*APPLY_ROUNDS);
        on_round(rounds, (&self.applied_entries, &*APPLIED_ENTRIES), entries);
    }
    pub fn on_dropped(&self, reason: &str) {
        inc(&self.dropped_messages, 1);
        MESSAGES_DROPPED.with_label_values(&[reason]).inc();
    }
    pub fn on_snapshot(&self, stage: &str) {
        match stage {
            "generated" => inc(&self.snapshots_generated, 1),
            "applied" => inc(&self.snapshots_applied, 1),
            "sent" => inc(&self.snapshots_sent, 1),
            "received" => inc(&self.snapshots_received, 1),
            "generate_failed" => inc(&self.snapshots_generate_failed, 1),
            "apply_failed" => inc(&self.snapshots_apply_failed, 1),
            _ => {}
        }
        SNAPSHOTS.with_label_values(&[stage]).inc();
    }
    pub fn synced_write_batches(&self) -> u64 {
        self.synced_write_batches.load(Ordering::Relaxed)
    }
}

pub fn set_awake_regions(n: usize) {
    AWAKE_REGIONS.set(n as i64);
}

pub fn set_regions(n: usize) {
    REGIONS.set(n as i64);
}

pub fn set_apply_pending(bytes: u64) {
    APPLY_PENDING.set(bytes as i64);
}
