//! [`RaftRouter`]: the handle the rest of the node (KV service, transport, PD client) uses
//! to reach regions: proposals, reads (lease, ReadIndex, local leader snapshots), splits, raft
//! messages and reports from the transport.

use crate::batch::SendError;
use crate::fsm::context::StoreContext;
use crate::metrics::StoreMetrics;
use crate::msg::{
    CasualMessage, PeerMsg, ReadCallback, RegionSnapshot, StoreMsg, WriteCallback, WriteResponse,
};
use crate::snap::SnapManager;
use crate::{util, Config, Error, PeerId, RegionId, Result, StoreId};
use atoll_engine::{KvEngine, DATA_CFS};
use atoll_proto::metapb;
use atoll_proto::raft_cmdpb::{RaftCmdRequest, RaftRequestHeader};
use atoll_proto::raft_serverpb::RaftMessage;
use std::sync::Arc;
use std::time::Instant;

/// The handle the node's services use to reach regions.
pub struct RaftRouter<E: KvEngine> {
    ctx: Arc<StoreContext<E>>,
}

impl<E: KvEngine> RaftRouter<E> {
    pub fn new(ctx: Arc<StoreContext<E>>) -> Self {
        RaftRouter { ctx }
    }
}

impl<E: KvEngine> Clone for RaftRouter<E> {
    fn clone(&self) -> Self {
        RaftRouter {
            ctx: self.ctx.clone(),
        }
    }
}

impl<E: KvEngine> RaftRouter<E> {
    /// Installs the observer of applied writes (once; later calls are ignored).
    pub fn set_apply_observer(&self, o: Arc<dyn crate::observer::ApplyObserver>) {
        let _ = self.ctx.observer.set(o);
    }

    pub fn store_id(&self) -> StoreId {
        StoreId(self.ctx.store_id)
    }

    pub fn engine(&self) -> &E {
        &self.ctx.engine
    }

    pub fn config(&self) -> &Config {
        &self.ctx.cfg
    }

    pub fn metrics(&self) -> &StoreMetrics {
        &self.ctx.metrics
    }

    pub fn snap_mgr(&self) -> &SnapManager {
        &self.ctx.snap_mgr
    }

    /// A raft message from another store.
    pub fn send_raft_message(&self, msg: RaftMessage) {
        let to_store = msg.to_peer.as_ref().map_or(0, |p| p.store_id);
        if to_store != self.ctx.store_id {
            self.ctx.metrics.on_dropped("store_not_match");
            return;
        }
        let id = msg.region_id;
        match self
            .ctx
            .router
            .try_send(id, PeerMsg::RaftMessage(Box::new(msg)))
        {
            Ok(()) => {}
            Err(SendError::Full(_)) => self.ctx.metrics.on_dropped("mailbox_full"),
            Err(SendError::Closed(PeerMsg::RaftMessage(m))) => {
                self.ctx.send_store_msg(StoreMsg::RaftMessage(m));
            }
            Err(SendError::Closed(_)) => {}
        }
    }

    /// Proposes a command; `cb` runs once it is applied (or refused).
    pub fn propose(&self, cmd: RaftCmdRequest, cb: WriteCallback) {
        let id = cmd.header.as_ref().map_or(0, |h| h.region_id);
        let msg = PeerMsg::RaftCommand {
            cmd: Box::new(cmd),
            cb,
        };
        self.send_or_refuse(id, msg);
    }

    /// Hands a request to region `id`'s mailbox, or refuses it if the mailbox is full or gone.
    fn send_or_refuse(&self, id: u64, msg: PeerMsg<E>) {
        if let Err(e) = self.ctx.router.try_send(id, msg) {
            let err = match &e {
                SendError::Full(_) => {
                    Error::ServerIsBusy(format!("region {id} has too many pending requests"))
                }
                SendError::Closed(_) => Error::RegionNotFound(id),
            };
            e.into_inner().refuse(err);
        }
    }

    pub async fn propose_async(&self, cmd: RaftCmdRequest) -> Result<WriteResponse> {
        answer(|cb| self.propose(cmd, cb)).await
    }

    /// A linearizable read: the callback gets a snapshot that includes every write
    /// acknowledged before the read began.
    pub fn read_index(&self, header: RaftRequestHeader, cb: ReadCallback<E::Snapshot>) {
        let id = header.region_id;
        let msg = PeerMsg::ReadIndex {
            header: Box::new(header),
            cb,
        };
        self.send_or_refuse(id, msg);
    }

    /// A linearizable read: within the leader's lease at once, from this store's applied
    /// state; otherwise through a ReadIndex round (which also renews the lease).
    pub async fn read_async(
        &self,
        header: RaftRequestHeader,
    ) -> Result<RegionSnapshot<E::Snapshot>> {
        if let Some(snap) = self.lease_read(&header) {
            self.ctx.metrics.on_read(true);
            return Ok(snap);
        }
        self.ctx.metrics.on_read(false);
        self.read_index_async(header).await
    }

    /// A snapshot served under the leader lease, or `None` (no valid lease, not the leader, not
    /// ready, or the request's epoch does not match: the ReadIndex path answers those).
    ///
    /// The snapshot is taken *before* the lease is checked: a lease valid at the check means no
    /// other leader has been elected and no split or membership change was under way up to
    /// then, so the state taken just before holds every write acknowledged before the read
    /// began (writes are acknowledged once applied here), and only committed ones.
    pub fn lease_read(&self, header: &RaftRequestHeader) -> Option<RegionSnapshot<E::Snapshot>> {
        if let Some(p) = &header.peer {
            if p.store_id != 0 && p.store_id != self.ctx.store_id {
                return None;
            }
        }
        let snap = self.ctx.engine.snapshot();
        let now = Instant::now();
        let (snap, renew) = {
            let meta = self.ctx.meta.lock();
            let d = meta.readers.get(&header.region_id)?;
            if d.term == 0 || !d.leader_ready || !d.lease.is_valid_at(now) {
                return None;
            }
            if util::check_epoch(&d.region, header.region_epoch.as_ref(), true, false).is_err() {
                return None;
            }
            let ahead = self.ctx.cfg.max_leader_lease() / 3;
            (
                RegionSnapshot {
                    snap,
                    region: d.region.clone(),
                    applied_index: 0,
                    term: d.term,
                },
                d.lease.take_renewal(now, ahead),
            )
        };
        if renew {
            // A ReadIndex round in the background renews the lease before it runs out.
            self.read_index(header.clone(), Box::new(|_| {}));
        }
        Some(snap)
    }

    /// A linearizable read through a ReadIndex round (never the lease).
    pub async fn read_index_async(
        &self,
        header: RaftRequestHeader,
    ) -> Result<RegionSnapshot<E::Snapshot>> {
        answer(|cb| self.read_index(header, cb)).await
    }

    /// A snapshot from a leader that has applied its own term's first entry, without a round
    /// of messages. It holds every write committed so far *provided the caller serializes
    /// writes per key through this store* (the transaction layer's latches); linearizable
    /// reads must use [`read_index`](Self::read_index).
    pub fn local_leader_snapshot(
        &self,
        region_id: RegionId,
        epoch: Option<&metapb::RegionEpoch>,
    ) -> Result<RegionSnapshot<E::Snapshot>> {
        let region_id = region_id.get();
        let d = {
            let meta = self.ctx.meta.lock();
            meta.readers.get(&region_id).cloned()
        };
        let Some(d) = d else {
            return Err(if self.ctx.router.mailbox(region_id).is_some() {
                Error::RegionNotInitialized(region_id)
            } else {
                Error::RegionNotFound(region_id)
            });
        };
        if d.term == 0 {
            // A sleeping follower asked for a leader's work wakes its group (cheap when awake).
            let _ = self.ctx.router.try_send(region_id, PeerMsg::Wake);
            return Err(Error::NotLeader {
                region_id,
                leader: d.leader,
            });
        }
        if !d.leader_ready {
            return Err(Error::ServerIsBusy(format!(
                "region {region_id}: new leader catching up"
            )));
        }
        util::check_epoch(&d.region, epoch, true, false)?;
        Ok(RegionSnapshot {
            snap: self.ctx.engine.snapshot(),
            region: d.region.clone(),
            applied_index: 0,
            term: d.term,
        })
    }

    /// The region this store holds for `key`, with the leader it knows of.
    pub fn region_for_key(&self, key: &[u8]) -> Option<(metapb::Region, Option<metapb::Peer>)> {
        let meta = self.ctx.meta.lock();
        let r = meta.region_for_key(key)?.clone();
        let leader = meta.readers.get(&r.id).and_then(|d| d.leader);
        Some((r, leader))
    }

    /// Every region this store hosts (initialized ones), with leadership.
    pub fn regions(&self) -> Vec<(metapb::Region, bool)> {
        let meta = self.ctx.meta.lock();
        meta.regions
            .values()
            .map(|r| {
                (
                    r.clone(),
                    meta.readers.get(&r.id).is_some_and(|d| d.term > 0),
                )
            })
            .collect()
    }

    /// The regions overlapping `[start, end)` that this store leads and that are ready to
    /// serve (their leader applied an entry of its own term), with the term of the
    /// leadership. O(log N + k) in the regions hosted.
    pub fn leaders_overlapping(&self, start: &[u8], end: &[u8]) -> Vec<(metapb::Region, u64)> {
        let meta = self.ctx.meta.lock();
        meta.overlapping(start, end, 0)
            .into_iter()
            .filter_map(|id| {
                let d = meta.readers.get(&id)?;
                (d.term > 0 && d.leader_ready).then(|| ((*d.region).clone(), d.term))
            })
            .collect()
    }

    pub fn region(&self, region_id: RegionId) -> Option<metapb::Region> {
        self.ctx.meta.lock().regions.get(&region_id.get()).cloned()
    }

    pub fn leader_of(&self, region_id: RegionId) -> Option<metapb::Peer> {
        self.ctx
            .meta
            .lock()
            .readers
            .get(&region_id.get())
            .and_then(|d| d.leader)
    }

    pub fn is_leader(&self, region_id: RegionId) -> bool {
        self.ctx
            .meta
            .lock()
            .readers
            .get(&region_id.get())
            .is_some_and(|d| d.term > 0)
    }

    pub fn region_count(&self) -> usize {
        self.ctx.router.len()
    }

    pub fn leader_count(&self) -> usize {
        self.ctx.meta.lock().leader_count()
    }

    pub fn awake_count(&self) -> usize {
        self.ctx.awake_count()
    }

    /// Split `region_id` at `keys` (ids come from PD).
    pub fn split(
        &self,
        region_id: RegionId,
        epoch: metapb::RegionEpoch,
        keys: Vec<Vec<u8>>,
        cb: WriteCallback,
    ) {
        let region_id = region_id.get();
        let msg = PeerMsg::Casual(CasualMessage::SplitRegion {
            epoch,
            split_keys: keys,
            cb: Some(cb),
        });
        if let Err(e) = self.ctx.router.force_send(region_id, msg) {
            e.into_inner().refuse(Error::RegionNotFound(region_id));
        }
    }

    pub async fn split_async(
        &self,
        region_id: RegionId,
        epoch: metapb::RegionEpoch,
        keys: Vec<Vec<u8>>,
    ) -> Result<WriteResponse> {
        answer(|cb| self.split(region_id, epoch, keys, cb)).await
    }

    pub fn send_casual(&self, region_id: RegionId, msg: CasualMessage) -> bool {
        self.ctx
            .router
            .force_send(region_id.get(), PeerMsg::Casual(msg))
            .is_ok()
    }

    /// The transport lost `store_id`: wake regions with peers there.
    /// The transport could not reach `store_id`.
    pub fn report_unreachable(&self, store_id: StoreId) {
        if let Some(t) = self
            .ctx
            .liveness
            .unreachable(store_id.get(), Instant::now())
        {
            self.ctx.on_liveness(t);
        }
    }

    /// A batch (or keep-alive) arrived from `store_id`.
    pub fn on_store_heard(&self, store_id: StoreId) {
        if let Some(t) = self.ctx.liveness.heard(store_id.get(), Instant::now()) {
            self.ctx.on_liveness(t);
        }
    }

    pub fn report_peer_unreachable(&self, region_id: RegionId, to_peer_id: PeerId) {
        let to_peer_id = to_peer_id.get();
        let _ = self
            .ctx
            .router
            .force_send(region_id.get(), PeerMsg::Unreachable { to_peer_id });
    }

    pub fn report_snapshot_status(&self, region_id: RegionId, to_peer_id: PeerId, ok: bool) {
        let to_peer_id = to_peer_id.get();
        let _ = self
            .ctx
            .router
            .force_send(region_id.get(), PeerMsg::SnapshotStatus { to_peer_id, ok });
        self.ctx
            .metrics
            .on_snapshot(if ok { "sent" } else { "send_failed" });
    }

    pub fn on_snapshot_received(&self) {
        self.ctx.metrics.on_snapshot("received");
    }

    /// Data size of the store's data column families (approximate).
    pub fn used_size(&self) -> u64 {
        DATA_CFS
            .iter()
            .filter_map(|cf| self.ctx.engine.approximate_size_cf(cf, &[], None).ok())
            .sum()
    }
}

/// Sends a request with a callback (`send`) and waits for its answer (a dropped callback
/// answers `StaleCommand`).
async fn answer<T: Send + 'static>(
    send: impl FnOnce(Box<dyn FnOnce(Result<T>) + Send>),
) -> Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    send(Box::new(move |r| {
        let _ = tx.send(r);
    }));
    rx.await.unwrap_or(Err(Error::StaleCommand))
}
