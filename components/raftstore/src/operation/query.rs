//! Reads: linearizable reads through a ReadIndex round (batched per round, answered once the
//! read index is applied), the leader lease that lets the KV service answer reads without one,
//! and the read delegate a peer publishes in the store's meta for that.

use crate::fsm::context::StoreContext;
use crate::meta::{LeaderLease, ReadDelegate};
use crate::msg::{ReadCallback, RegionSnapshot};
use crate::raft::peer::{Peer, ReadBatch};
use crate::util::check_epoch;
use crate::Error;
use atoll_engine::KvEngine;
use atoll_proto::raft_cmdpb::RaftRequestHeader;
use std::sync::Arc;
use std::time::Instant;

impl<E: KvEngine> Peer<E> {
    pub fn read_index(
        &mut self,
        ctx: &StoreContext<E>,
        header: &RaftRequestHeader,
        cb: ReadCallback<E::Snapshot>,
    ) {
        if self.pending_remove {
            return cb(Err(Error::RegionNotFound(self.region_id)));
        }
        if let Err(e) = self.check_header(ctx, header) {
            return cb(Err(e));
        }
        if !self.is_leader() {
            self.wake_if_asked_to_lead(ctx);
            return cb(Err(self.not_leader()));
        }
        if let Err(e) = check_epoch(self.region(), header.region_epoch.as_ref(), true, false) {
            return cb(Err(e));
        }
        self.wake(ctx);
        self.pending_reads
            .push((header.region_epoch.unwrap_or_default(), cb));
    }

    /// Issues one read index request for every read queued this round (once the leader has
    /// committed an entry of its term; raft-rs drops read requests before that).
    pub fn maybe_issue_reads(&mut self, ctx: &StoreContext<E>) {
        if self.pending_reads.is_empty()
            || !self.is_leader()
            || !self.raft_group.raft.commit_to_current_term()
        {
            return;
        }
        let id = ctx.next_read_id();
        self.raft_group.read_index(id.to_be_bytes().to_vec());
        let reads = std::mem::take(&mut self.pending_reads);
        self.inflight_reads.push_back(ReadBatch {
            id,
            index: None,
            issued_tick: self.ticks,
            issued_at: Instant::now(),
            reads,
        });
    }

    pub(crate) fn retry_stale_reads(&mut self, ctx: &StoreContext<E>) {
        let timeout = ctx.cfg.raft_election_timeout_ticks as u64;
        let ticks = self.ticks;
        let mut reissue = vec![];
        for b in self.inflight_reads.iter_mut() {
            if b.index.is_none() && ticks.saturating_sub(b.issued_tick) >= timeout {
                b.id = ctx.next_read_id();
                b.issued_tick = ticks;
                b.issued_at = Instant::now();
                reissue.push(b.id);
            }
        }
        if self.raft_group.raft.commit_to_current_term() {
            for id in reissue {
                self.raft_group.read_index(id.to_be_bytes().to_vec());
            }
        }
    }

    pub(crate) fn on_read_state(&mut self, ctx: &StoreContext<E>, ctx_bytes: &[u8], index: u64) {
        let Ok(id) = <[u8; 8]>::try_from(ctx_bytes).map(u64::from_be_bytes) else {
            return;
        };
        let mut confirmed_at = None;
        if let Some(b) = self.inflight_reads.iter_mut().find(|b| b.id == id) {
            b.index = Some(index);
            confirmed_at = Some(b.issued_at);
        }
        // A quorum answered a heartbeat sent after the read was requested.
        if let Some(at) = confirmed_at {
            self.renew_lease(ctx, at);
        }
    }

    // ---------------- the leader lease ----------------

    /// Extends the lease to `from + raft-max-leader-lease`: a quorum acknowledged a message
    /// this leader sent at or after `from`, and each of its members refuses to vote for anyone
    /// else for an election timeout after hearing from its leader (`check_quorum`; a
    /// restarted store: `Peer::holds_vote`).
    pub(crate) fn renew_lease(&mut self, ctx: &StoreContext<E>, from: Instant) {
        let len = ctx.cfg.max_leader_lease();
        if len.is_zero()
            || !self.is_leader()
            || self.lease_term != self.term()
            || self.no_lease_term == self.term()
            || self.applied_index < self.lease_blocked_until
            || self.raft_group.raft.lead_transferee.is_some()
        {
            return;
        }
        self.lease.renew(from, len);
    }

    /// No lease for the rest of this term.
    pub(crate) fn forbid_lease(&mut self) {
        self.no_lease_term = self.term();
        self.lease.expire();
    }

    /// No lease until the entry at `index` (a split or membership change) is applied.
    pub(crate) fn block_lease_until(&mut self, index: u64) {
        self.lease_blocked_until = self.lease_blocked_until.max(index);
        self.lease.expire();
    }

    /// Answers reads whose read index is applied.
    pub fn serve_reads(&mut self, ctx: &StoreContext<E>) {
        if !self.is_leader() {
            return;
        }
        let mut snap: Option<E::Snapshot> = None;
        while let Some(b) = self.inflight_reads.front() {
            match b.index {
                Some(i) if i <= self.applied_index => {}
                _ => break,
            }
            let b = self.inflight_reads.pop_front().expect("front exists");
            let s = snap.get_or_insert_with(|| ctx.engine.snapshot()).clone();
            let region = Arc::new(self.region().clone());
            for (epoch, cb) in b.reads {
                let resp = match check_epoch(&region, Some(&epoch), true, false) {
                    Ok(()) => Ok(RegionSnapshot {
                        snap: s.clone(),
                        region: region.clone(),
                        applied_index: self.applied_index,
                        term: self.term(),
                    }),
                    Err(e) => Err(e),
                };
                cb(resp);
            }
        }
    }

    pub fn fail_reads(&mut self, err: &Error) {
        for (_, cb) in self.pending_reads.drain(..) {
            cb(Err(err.clone()));
        }
        for b in self.inflight_reads.drain(..) {
            for (_, cb) in b.reads {
                cb(Err(err.clone()));
            }
        }
    }

    /// Tells the store (and through it the KV service) who leads and whether it is ready.
    pub fn publish(&mut self, ctx: &StoreContext<E>) {
        let term = if self.is_leader() { self.term() } else { 0 };
        if self.lease_term != term {
            // A new leadership (or none): the old lease ends, the new one starts expired.
            self.lease.expire();
            self.lease = Arc::new(LeaderLease::new());
            self.lease_term = term;
        }
        let ready = self.leader_ready();
        let leader = self.leader().map(|p| p.id);
        let now = Some((term, ready, leader));
        if self.published == now {
            return;
        }
        self.published = now;
        let mut meta = ctx.meta.lock();
        let d = ReadDelegate {
            region: Arc::new(self.region().clone()),
            peer: self.meta,
            term,
            leader_ready: ready,
            leader: self.leader(),
            lease: self.lease.clone(),
            approximate_size: self.approximate_size.unwrap_or(0),
            approximate_keys: self.approximate_keys.unwrap_or(0),
        };
        meta.readers.insert(self.region_id, d);
    }

    /// Republishes after a region change.
    pub fn republish(&mut self, ctx: &StoreContext<E>) {
        self.published = None;
        self.publish(ctx);
    }
}
