//! The raft state of one region's peer: its `RawNode` over [`PeerStorage`], the proposals
//! waiting to be applied, the reads waiting for their read index, and the bookkeeping the
//! features in [`crate::operation`] share. Only the state and what reads it lives here; each
//! feature adds its behaviour to [`Peer`] in its own module (commands, reads and leases,
//! the Ready cycle, conf changes, splits, hibernation, log GC, PD reports).

use crate::meta::LeaderLease;
use crate::msg::{ReadCallback, WriteCallback};
use crate::raft::storage::PeerStorage;
use crate::{Config, Error, Result};
use atoll_engine::KvEngine;
use atoll_proto::metapb;
use atoll_proto::raft_cmdpb::RaftRequestHeader;
use atoll_proto::raft_serverpb::{RaftMessage, SnapshotMeta};
use raft::eraftpb::Entry;
use raft::{RawNode, Ready, StateRole};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

pub struct Proposal {
    pub index: u64,
    pub term: u64,
    /// When it was proposed: once committed, a quorum has heard from this leader since.
    pub proposed_at: Instant,
    pub cb: WriteCallback,
}

pub(crate) struct ReadBatch<S> {
    pub(crate) id: u64,
    pub(crate) index: Option<u64>,
    pub(crate) issued_tick: u64,
    /// When its read index was requested (before the heartbeat carrying it left).
    pub(crate) issued_at: Instant,
    pub(crate) reads: Vec<(metapb::RegionEpoch, ReadCallback<S>)>,
}

pub struct Peer<E: KvEngine> {
    pub region_id: u64,
    pub meta: metapb::Peer,
    pub tag: String,
    pub raft_group: RawNode<PeerStorage<E>>,
    pub peer_cache: HashMap<u64, metapb::Peer>,
    /// Last time each other peer was heard from (leader's view).
    pub peer_heartbeats: HashMap<u64, Instant>,
    pub proposals: VecDeque<Proposal>,
    pub(crate) pending_reads: Vec<(metapb::RegionEpoch, ReadCallback<E::Snapshot>)>,
    pub(crate) inflight_reads: VecDeque<ReadBatch<E::Snapshot>>,
    pub hibernating: bool,
    pub(crate) idle_ticks: usize,
    pub ticks: u64,
    pub applied_index: u64,
    pub applied_term: u64,
    /// Highest index handed to the apply side.
    pub last_sent_to_apply: u64,
    /// Committed entries handed to the apply side and not applied yet: (last index, bytes)
    /// per hand-over. Bounds what this peer fetches from the log (see [`Self::apply_budget`]).
    pub(crate) apply_pending: VecDeque<(u64, u64)>,
    pub(crate) apply_pending_bytes: u64,
    /// The last ready left committed entries in the log because apply is behind.
    pub(crate) apply_held: bool,
    pub pending_remove: bool,
    pub applying_snapshot: bool,
    /// Committed entries held while a snapshot is being applied.
    pub pending_committed: Vec<Entry>,
    /// The snapshot being applied (its metadata and the apply state it sets), kept so that a
    /// failed apply can be tried again: raft already counts the snapshot as applied, so the
    /// peer must not go on (nor serve) until its data is in.
    pub applying_snap: Option<(SnapshotMeta, atoll_proto::raft_serverpb::RaftApplyState)>,
    /// Failed attempts at applying `applying_snap`.
    pub snap_apply_failures: u32,
    pub(crate) pending_ready: Option<Ready>,
    pub(crate) pending_snapshot: Option<SnapshotMeta>,
    pub leader_missing_since: Option<Instant>,
    pub last_validate: Option<Instant>,
    // Split and size bookkeeping.
    pub approximate_size: Option<u64>,
    pub approximate_keys: Option<u64>,
    pub size_diff_hint: u64,
    pub keys_diff_hint: u64,
    pub split_check_pending: bool,
    pub raft_log_size_hint: u64,
    pub written_bytes: u64,
    pub written_keys: u64,
    /// What the last region heartbeat told PD, and when (heartbeats are sent on change).
    pub(crate) last_pd_report: Option<(crate::operation::pd_report::PdReport, Instant)>,
    /// The store's view of whether this peer is a leader ready to serve local snapshots.
    pub(crate) published: Option<(u64, bool, Option<u64>)>,
    /// Campaign on start (the new half of a split whose parent this store led).
    pub campaign_on_start: bool,
    /// This leadership's lease (shared with the read delegate) and the term it belongs to.
    pub(crate) lease: Arc<LeaderLease>,
    pub(crate) lease_term: u64,
    /// A term in which this leader sent `MsgTimeoutNow`: the target may campaign, with votes
    /// that ignore leases, at any later time, so no lease is trusted for the rest of the term.
    pub(crate) no_lease_term: u64,
    /// A split or membership change is proposed up to this index: no lease until it is applied
    /// (a split moves keys to regions led elsewhere; a membership change changes the quorum).
    pub(crate) lease_blocked_until: u64,
}

pub fn raft_config(cfg: &Config, peer_id: u64, applied: u64) -> raft::Config {
    raft::Config {
        id: peer_id,
        election_tick: cfg.raft_election_timeout_ticks,
        heartbeat_tick: cfg.raft_heartbeat_ticks,
        applied,
        max_size_per_msg: cfg.raft_max_size_per_msg.0,
        max_inflight_msgs: cfg.raft_max_inflight_msgs,
        check_quorum: true,
        pre_vote: true,
        read_only_option: raft::ReadOnlyOption::Safe,
        batch_append: true,
        max_committed_size_per_ready: 16 << 20,
        ..Default::default()
    }
}

impl<E: KvEngine> Peer<E> {
    /// A peer from the states in `engine` (fresh ones for a peer that waits for a snapshot).
    pub fn new(
        cfg: &Config,
        engine: E,
        logger: &slog::Logger,
        region: metapb::Region,
        meta: metapb::Peer,
    ) -> Result<Self> {
        let tag = format!("[region {}] peer {}", region.id, meta.id);
        let storage = PeerStorage::new(
            engine,
            region.clone(),
            tag.clone(),
            cfg.raft_entry_cache_size.0 as usize,
        )?;
        let applied = storage.applied_index();
        let applied_term = storage.apply_state.applied_term;
        let logger = logger.new(slog::o!("region_id" => region.id, "peer_id" => meta.id));
        let raft_group = RawNode::new(&raft_config(cfg, meta.id, applied), storage, &logger)?;
        let mut peer_cache = HashMap::new();
        for p in &region.peers {
            peer_cache.insert(p.id, *p);
        }
        Ok(Peer {
            region_id: region.id,
            meta,
            tag,
            raft_group,
            peer_cache,
            peer_heartbeats: HashMap::new(),
            proposals: VecDeque::new(),
            pending_reads: vec![],
            inflight_reads: VecDeque::new(),
            hibernating: false,
            idle_ticks: 0,
            ticks: 0,
            applied_index: applied,
            applied_term,
            last_sent_to_apply: applied,
            apply_pending: VecDeque::new(),
            apply_pending_bytes: 0,
            apply_held: false,
            pending_remove: false,
            applying_snapshot: false,
            pending_committed: vec![],
            applying_snap: None,
            snap_apply_failures: 0,
            pending_ready: None,
            pending_snapshot: None,
            leader_missing_since: None,
            last_validate: None,
            approximate_size: None,
            approximate_keys: None,
            size_diff_hint: 0,
            keys_diff_hint: 0,
            split_check_pending: false,
            raft_log_size_hint: 0,
            written_bytes: 0,
            written_keys: 0,
            last_pd_report: None,
            published: None,
            campaign_on_start: false,
            lease: Arc::new(LeaderLease::new()),
            lease_term: 0,
            no_lease_term: 0,
            lease_blocked_until: 0,
        })
    }

    pub fn region(&self) -> &metapb::Region {
        &self.raft_group.store().region
    }

    pub fn is_initialized(&self) -> bool {
        self.raft_group.store().is_initialized()
    }

    pub fn is_leader(&self) -> bool {
        self.raft_group.raft.state == StateRole::Leader
    }

    pub fn term(&self) -> u64 {
        self.raft_group.raft.term
    }

    pub fn leader_id(&self) -> u64 {
        self.raft_group.raft.leader_id
    }

    pub fn leader(&self) -> Option<metapb::Peer> {
        let id = self.leader_id();
        if id == raft::INVALID_ID {
            return None;
        }
        self.peer_cache.get(&id).cloned()
    }

    pub fn not_leader(&self) -> Error {
        Error::NotLeader {
            region_id: self.region_id,
            leader: self.leader(),
        }
    }

    /// Whether this peer can serve reads and local snapshots: leader, with an entry of its
    /// own term applied.
    pub fn leader_ready(&self) -> bool {
        self.is_leader() && self.applied_term == self.term()
    }

    /// A request header from this peer for its region as it is now.
    pub fn header(&self) -> RaftRequestHeader {
        RaftRequestHeader {
            region_id: self.region_id,
            peer: Some(self.meta),
            region_epoch: self.region().region_epoch,
            keys: vec![],
        }
    }

    /// A message from this peer to `to` about this region as it is now (its epoch and range).
    pub fn raft_message_to(&self, to: metapb::Peer) -> RaftMessage {
        let region = self.region();
        RaftMessage {
            region_id: self.region_id,
            from_peer: Some(self.meta),
            to_peer: Some(to),
            region_epoch: region.region_epoch,
            start_key: region.start_key.clone(),
            end_key: region.end_key.clone(),
            ..Default::default()
        }
    }

    pub fn needs_poll(&self) -> bool {
        if self.applying_snapshot || self.pending_remove || !self.raft_group.has_ready() {
            return false;
        }
        // Committed entries held back for a lagging apply wait for its next result (a
        // message that schedules this peer again), not for another round now.
        !self.apply_held || self.has_work_besides_committed()
    }

    pub(crate) fn has_work_besides_committed(&self) -> bool {
        let raft = &self.raft_group.raft;
        !raft.msgs.is_empty()
            || !raft.read_states.is_empty()
            || !raft.raft_log.unstable_entries().is_empty()
            || self.raft_group.snap().is_some()
    }
}
