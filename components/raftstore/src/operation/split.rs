//! Splits: the split checker's findings and clients' requests become split keys; PD gives
//! ids; the leader proposes a batch split; every peer applies it (the parent keeps the first
//! range, each new region gets the next, its states written with the data), and the raft side
//! registers the new ranges and creates their peers under one lock of the store's meta.

use crate::fsm::apply::ApplyFsm;
use crate::fsm::apply_poller::ApplyPoller;
use crate::fsm::context::StoreContext;
use crate::fsm::peer::PeerFsm;
use crate::msg::{ExecResult, WriteCallback, WriteResponse};
use crate::operation::life;
use crate::raft::storage;
use crate::task::{PdTask, SplitCheckMsg, SplitCheckTask};
use crate::util;
use crate::{Error, Result};
use atoll_engine::KvEngine;
use atoll_proto::raft_cmdpb::{
    AdminCmdType, AdminRequest, BatchSplitRequest, RaftCmdRequest, SplitRequest,
};
use atoll_proto::raft_serverpb::PeerState;
use atoll_proto::{metapb, pdpb};

/// The one rule for split keys: at least one, each inside the region, strictly ascending and
/// above the region's start (so that every part is non-empty).
pub fn check_split_keys<'a>(
    region: &metapb::Region,
    keys: impl IntoIterator<Item = &'a [u8]>,
) -> Result<()> {
    let mut prev: &[u8] = &region.start_key;
    let mut any = false;
    for k in keys {
        any = true;
        util::check_key_in_region(k, region)?;
        if k <= prev {
            return Err(Error::InvalidRequest(
                "split keys must be sorted, distinct and inside the region (not its start)".into(),
            ));
        }
        prev = k;
    }
    if !any {
        return Err(Error::InvalidRequest("no split keys".into()));
    }
    Ok(())
}

/// A batch split's requests: valid keys ([`check_split_keys`]) and one new peer id per peer.
pub fn validate_split_requests(region: &metapb::Region, splits: &BatchSplitRequest) -> Result<()> {
    check_split_keys(
        region,
        splits.requests.iter().map(|s| s.split_key.as_slice()),
    )?;
    if splits
        .requests
        .iter()
        .any(|s| s.new_peer_ids.len() != region.peers.len())
    {
        return Err(Error::InvalidRequest(
            "split needs one new peer id per peer".into(),
        ));
    }
    Ok(())
}

/// A batch split command, checked before it is proposed.
pub fn validate_split_cmd(region: &metapb::Region, cmd: &RaftCmdRequest) -> Result<()> {
    let splits = cmd
        .admin_request
        .as_ref()
        .and_then(|a| a.splits.as_ref())
        .ok_or_else(|| Error::InvalidRequest("batch split without splits".into()))?;
    validate_split_requests(region, splits)
}

impl<E: KvEngine> PeerFsm<E> {
    /// The split checker measured the region (and may have found split keys).
    pub(crate) fn on_split_check_result(
        &mut self,
        ctx: &StoreContext<E>,
        epoch: metapb::RegionEpoch,
        split_keys: Vec<Vec<u8>>,
        size: u64,
        keys: u64,
    ) {
        self.on_region_stats(size, keys);
        if split_keys.is_empty() || !self.peer.is_leader() {
            return;
        }
        if util::epoch(self.peer.region()) != epoch {
            return;
        }
        ctx.schedule_pd(PdTask::AskSplit {
            region: self.peer.region().clone(),
            split_keys,
            cb: None,
        });
    }

    pub(crate) fn on_region_stats(&mut self, size: u64, keys: u64) {
        self.peer.split_check_pending = false;
        self.peer.approximate_size = Some(size);
        self.peer.approximate_keys = Some(keys);
    }

    /// Asks PD for the ids of a split at `split_keys` (checked first; `cb` gets a refusal).
    pub(crate) fn ask_split(
        &mut self,
        ctx: &StoreContext<E>,
        epoch: &metapb::RegionEpoch,
        split_keys: Vec<Vec<u8>>,
        cb: Option<WriteCallback>,
    ) {
        match self.check_split_request(epoch, &split_keys) {
            Ok(()) => {
                ctx.schedule_pd(PdTask::AskSplit {
                    region: self.peer.region().clone(),
                    split_keys,
                    cb,
                });
            }
            Err(e) => {
                if let Some(cb) = cb {
                    cb(Err(e));
                }
            }
        }
    }

    /// PD gave ids for a split: propose it.
    pub(crate) fn propose_split(
        &mut self,
        ctx: &StoreContext<E>,
        epoch: metapb::RegionEpoch,
        split_keys: Vec<Vec<u8>>,
        ids: Vec<pdpb::SplitId>,
        cb: Option<WriteCallback>,
    ) {
        let cb: WriteCallback = cb.unwrap_or_else(|| Box::new(|_| {}));
        if let Err(e) = self.check_split_request(&epoch, &split_keys) {
            return cb(Err(e));
        }
        if ids.len() != split_keys.len() {
            return cb(Err(Error::Other(
                "PD gave the wrong number of split ids".into(),
            )));
        }
        let requests = split_keys
            .into_iter()
            .zip(ids)
            .map(|(k, id)| SplitRequest {
                split_key: k,
                new_region_id: id.new_region_id,
                new_peer_ids: id.new_peer_ids,
            })
            .collect();
        let cmd = RaftCmdRequest {
            header: Some(self.peer.header()),
            requests: vec![],
            admin_request: Some(AdminRequest {
                cmd_type: AdminCmdType::BatchSplit as i32,
                splits: Some(BatchSplitRequest { requests }),
                ..Default::default()
            }),
        };
        self.peer.propose(ctx, cmd, cb);
    }

    fn check_split_request(&self, epoch: &metapb::RegionEpoch, keys: &[Vec<u8>]) -> Result<()> {
        if !self.peer.is_leader() {
            return Err(self.peer.not_leader());
        }
        let region = self.peer.region();
        util::check_epoch(region, Some(epoch), true, true)?;
        check_split_keys(region, keys.iter().map(|k| k.as_slice()))
    }

    pub(crate) fn schedule_split_check(&mut self, ctx: &StoreContext<E>, force: bool) {
        if self.peer.split_check_pending || !self.peer.is_leader() || !self.peer.is_initialized() {
            return;
        }
        self.peer.split_check_pending = true;
        self.peer.size_diff_hint = 0;
        self.peer.keys_diff_hint = 0;
        let task = SplitCheckTask {
            region: self.peer.region().clone(),
            snap: ctx.engine.snapshot(),
            split_size: ctx.cfg.region_split_size.0,
            split_keys: ctx.cfg.region_split_keys,
            force,
        };
        if ctx.split_tx.try_send(SplitCheckMsg::Check(task)).is_err() {
            self.peer.split_check_pending = false;
        }
    }

    pub(crate) fn maybe_split_check(&mut self, ctx: &StoreContext<E>) {
        let diff = ctx.cfg.split_check_diff();
        let p = &self.peer;
        if p.size_diff_hint < diff && p.keys_diff_hint < (ctx.cfg.region_split_keys / 8).max(1) {
            return;
        }
        let due = match (p.approximate_size, p.approximate_keys) {
            (Some(s), Some(k)) => {
                s + p.size_diff_hint >= ctx.cfg.region_split_size.0
                    || k + p.keys_diff_hint >= ctx.cfg.region_split_keys
            }
            _ => true,
        };
        if due {
            self.schedule_split_check(ctx, false);
        } else {
            // Fold the estimate forward and wait for more writes.
            let p = &mut self.peer;
            p.approximate_size = p.approximate_size.map(|s| s + p.size_diff_hint);
            p.approximate_keys = p.approximate_keys.map(|k| k + p.keys_diff_hint);
            p.size_diff_hint = 0;
            p.keys_diff_hint = 0;
        }
    }

    pub(crate) fn on_split(
        &mut self,
        ctx: &StoreContext<E>,
        derived: metapb::Region,
        new_regions: Vec<metapb::Region>,
    ) {
        let was_leader = self.peer.is_leader();
        self.peer.raft_group.mut_store().region = derived.clone();
        let parts = new_regions.len() as u64 + 1;
        self.peer.approximate_size = self.peer.approximate_size.map(|s| s / parts);
        self.peer.approximate_keys = self.peer.approximate_keys.map(|k| k / parts);
        // The derived range and the new regions go into the store's map under one lock: a
        // message for a new region that arrives meanwhile (on the store thread) then finds the
        // region known and waits for its peer, instead of creating an empty peer that would
        // take the split's place (and apply entries with no range: data lost on this store).
        let mut creating = vec![];
        {
            let mut meta = ctx.meta.lock();
            meta.set_region(&derived);
            for region in &new_regions {
                let Some(my) = util::find_peer(region, ctx.store_id).cloned() else {
                    continue;
                };
                // A peer already exists. If initialized, it was created some other way (a
                // snapshot); if not, the split initializes it (replaced below).
                if meta.regions.contains_key(&region.id) && ctx.router.mailbox(region.id).is_some()
                {
                    continue;
                }
                if !meta
                    .overlapping(&region.start_key, &region.end_key, region.id)
                    .is_empty()
                {
                    tracing::warn!(tag = %self.peer.tag, new = region.id, "split range overlaps an existing region; not creating its peer");
                    continue;
                }
                meta.set_region(region);
                creating.push((region.clone(), my));
            }
        }
        self.peer.republish(ctx);
        for (region, my) in creating {
            if let Some(mb) = ctx.router.mailbox(region.id) {
                mb.close();
                ctx.router.unregister(region.id, &mb);
                if let Some(m) = ctx.apply_router.mailbox(region.id) {
                    m.close();
                    ctx.apply_router.unregister(region.id, &m);
                }
            }
            let id = region.id;
            if let Err(e) = life::create_peer(ctx, region, my, was_leader) {
                tracing::error!(tag = %self.peer.tag, error = %e, new = id, "create split peer")
            }
        }
        if was_leader {
            self.peer.heartbeat_pd(ctx);
            let mut all = vec![derived];
            all.extend(new_regions);
            ctx.schedule_pd(PdTask::ReportSplit { regions: all });
        }
    }
}

impl<E: KvEngine> ApplyFsm<E> {
    pub(crate) fn exec_split(
        &mut self,
        ctx: &mut ApplyPoller<E>,
        cmd: &RaftCmdRequest,
    ) -> Result<WriteResponse> {
        let splits = cmd
            .admin_request
            .as_ref()
            .and_then(|a| a.splits.clone())
            .ok_or_else(|| Error::InvalidRequest("split without requests".into()))?;
        validate_split_requests(&self.region, &splits)?;
        fail::fail_point!(crate::failpoints::APPLY_SPLIT);
        let mut ep = util::epoch(&self.region);
        ep.version += splits.requests.len() as u64;
        let mut derived = self.region.clone();
        derived.region_epoch = Some(ep);
        let mut new_regions = vec![];
        for (i, s) in splits.requests.iter().enumerate() {
            // The last new region ends where the parent did (unbounded stays unbounded).
            let end = splits
                .requests
                .get(i + 1)
                .map(|n| n.split_key.clone())
                .unwrap_or_else(|| self.region.end_key.clone());
            let peers = self
                .region
                .peers
                .iter()
                .zip(&s.new_peer_ids)
                .map(|(p, id)| metapb::Peer {
                    id: *id,
                    store_id: p.store_id,
                    role: p.role,
                })
                .collect();
            new_regions.push(metapb::Region {
                id: s.new_region_id,
                start_key: s.split_key.clone(),
                end_key: end,
                region_epoch: Some(ep),
                peers,
            });
        }
        derived.end_key = splits.requests[0].split_key.clone();
        storage::write_region_state(&mut ctx.wb, &derived, PeerState::Normal)?;
        for r in &new_regions {
            // A peer of the new region may already exist here, uninitialized (it heard from
            // the new region's leader first): keep its vote and term.
            let existing = storage::load_raft_state(&ctx.ctx.engine, r.id)?;
            match storage::load_region_state(&ctx.ctx.engine, r.id)? {
                Some(s)
                    if s.region.as_ref().is_some_and(|x| !x.peers.is_empty())
                        && s.state != PeerState::Tombstone as i32 =>
                {
                    continue;
                }
                _ => {}
            }
            storage::write_initial_states(&mut ctx.wb, r)?;
            if let Some(mut rs) = existing {
                let init = storage::initial_raft_state();
                if rs.term > init.term {
                    rs.last_index = init.last_index;
                    rs.last_term = init.last_term;
                    rs.commit = init.commit;
                    storage::write_raft_state(&mut ctx.wb, r.id, &rs)?;
                }
            }
        }
        self.region = derived.clone();
        let mut regions = vec![derived.clone()];
        regions.extend(new_regions.iter().cloned());
        self.exec_results.push(ExecResult::Split {
            derived,
            new_regions,
        });
        Ok(WriteResponse {
            regions,
            ..Default::default()
        })
    }
}
