//! The apply side: committed entries become engine writes, in batches across regions, off the
//! raft pollers. The applied index is written in the same (unsynced) batch as the data it
//! covers; the raft log is the durable record, so a crash replays from the applied index.
//! Admin commands (conf change, split, log compaction) change the region here first and are
//! reported to the raft side as `ExecResult`s.

use crate::batch::{Fsm, PollHandler};
use crate::msg::{ApplyRes, ExecResult, PeerMsg, WriteCallback, WriteResponse};
use crate::storage::{self, GenSnapRequest};
use crate::store::StoreContext;
use crate::util::{self, check_epoch};
use crate::worker::RegionTask;
use crate::{Error, Result};
use atoll_engine::{KvEngine, WriteBatch, CF_RAFT};
use atoll_proto::metapb::{self, PeerRole};
use atoll_proto::raft_cmdpb::{AdminCmdType, CmdType, RaftCmdRequest};
use atoll_proto::raft_serverpb::{PeerState, RaftApplyState, RaftTruncatedState};
use protobuf::Message as PbMessage;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType};
use std::collections::VecDeque;
use std::sync::Arc;

pub enum ApplyMsg {
    Apply {
        term: u64,
        entries: Vec<Entry>,
        cbs: Vec<(u64, u64, WriteCallback)>,
    },
    /// A snapshot replaced the region's data and state.
    Reset {
        region: metapb::Region,
        apply_state: RaftApplyState,
    },
    /// Capture a consistent engine snapshot at the current applied index.
    GenSnapshot {
        request: GenSnapRequest,
    },
    Destroy,
}

pub struct ApplyFsm<E: KvEngine> {
    pub region_id: u64,
    pub peer_id: u64,
    region: metapb::Region,
    apply_state: RaftApplyState,
    tag: String,
    cbs: VecDeque<(u64, u64, WriteCallback)>,
    stopped: bool,
    // This round.
    dirty: bool,
    exec_results: Vec<ExecResult>,
    written_bytes: u64,
    written_keys: u64,
    _e: std::marker::PhantomData<E>,
}

impl<E: KvEngine> Fsm for ApplyFsm<E> {
    type Message = ApplyMsg;
    fn is_stopped(&self) -> bool {
        self.stopped
    }
}

impl<E: KvEngine> ApplyFsm<E> {
    pub fn new(region: metapb::Region, peer_id: u64, apply_state: RaftApplyState) -> Box<Self> {
        Box::new(ApplyFsm {
            region_id: region.id,
            peer_id,
            tag: format!("[region {}] apply {}", region.id, peer_id),
            region,
            apply_state,
            cbs: VecDeque::new(),
            stopped: false,
            dirty: false,
            exec_results: vec![],
            written_bytes: 0,
            written_keys: 0,
            _e: std::marker::PhantomData,
        })
    }

    fn applied_index(&self) -> u64 {
        self.apply_state.applied_index
    }

    fn apply_entries(&mut self, ctx: &mut ApplyPoller<E>, entries: Vec<Entry>) {
        for e in entries {
            if e.index <= self.applied_index() {
                continue;
            }
            if e.index != self.applied_index() + 1 {
                panic!(
                    "{} applies entry {} after {}: a gap in the log",
                    self.tag,
                    e.index,
                    self.applied_index()
                );
            }
            fail::fail_point!(crate::failpoints::BEFORE_APPLY);
            let result = match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => Ok(WriteResponse::default()),
                EntryType::EntryNormal => match prost::Message::decode(e.get_data()) {
                    Ok(cmd) => self.exec(ctx, cmd),
                    Err(err) => Err(Error::Other(format!("undecodable command: {err}"))),
                },
                EntryType::EntryConfChange => self.exec_conf_change(ctx, &e),
                EntryType::EntryConfChangeV2 => {
                    Err(Error::InvalidRequest("joint consensus is not used".into()))
                }
            };
            self.apply_state.applied_index = e.index;
            self.apply_state.applied_term = e.term;
            self.dirty = true;
            ctx.entries += 1;
            self.respond(ctx, e.index, e.term, result);
            if ctx.wb.data_size() >= ctx.ctx.cfg.apply_batch_size.0 as usize {
                self.write_apply_state(ctx);
                ctx.flush();
            }
            if self.stopped {
                return;
            }
        }
    }

    fn respond(
        &mut self,
        ctx: &mut ApplyPoller<E>,
        index: u64,
        term: u64,
        result: Result<WriteResponse>,
    ) {
        let mut result = Some(result);
        while let Some((i, _, _)) = self.cbs.front() {
            if *i > index {
                break;
            }
            let (i, t, cb) = self.cbs.pop_front().expect("front exists");
            if i == index && t == term {
                let mut r = result.take().expect("one answer per entry");
                if let Ok(w) = &mut r {
                    w.index = index;
                    w.term = term;
                }
                ctx.pending_cbs.push((cb, r));
            } else {
                ctx.pending_cbs.push((cb, Err(Error::StaleCommand)));
            }
        }
    }

    fn exec(&mut self, ctx: &mut ApplyPoller<E>, cmd: RaftCmdRequest) -> Result<WriteResponse> {
        let header = cmd.header.clone().unwrap_or_default();
        if let Some(admin) = &cmd.admin_request {
            return match AdminCmdType::try_from(admin.cmd_type) {
                Ok(AdminCmdType::BatchSplit) => {
                    check_epoch(&self.region, header.region_epoch.as_ref(), true, true)?;
                    self.exec_split(ctx, &cmd)
                }
                Ok(AdminCmdType::CompactLog) => self.exec_compact_log(&cmd),
                _ => Err(Error::InvalidRequest("unknown admin command".into())),
            };
        }
        check_epoch(&self.region, header.region_epoch.as_ref(), true, false)?;
        // Validate every key first: a command applies whole or not at all.
        for r in &cmd.requests {
            match CmdType::try_from(r.cmd_type) {
                Ok(CmdType::Put) => {
                    let p = r
                        .put
                        .as_ref()
                        .ok_or_else(|| Error::InvalidRequest("put without body".into()))?;
                    util::check_key_in_region(&util::user_key_of(&p.key)?, &self.region)?;
                }
                Ok(CmdType::Delete) => {
                    let d = r
                        .delete
                        .as_ref()
                        .ok_or_else(|| Error::InvalidRequest("delete without body".into()))?;
                    util::check_key_in_region(&util::user_key_of(&d.key)?, &self.region)?;
                }
                Ok(CmdType::DeleteRange) => {
                    let d = r
                        .delete_range
                        .as_ref()
                        .ok_or_else(|| Error::InvalidRequest("delete range without body".into()))?;
                    util::check_key_in_region(&util::user_key_of(&d.start_key)?, &self.region)?;
                    let end = util::user_key_of(&d.end_key)?;
                    if !self.region.end_key.is_empty() && end > self.region.end_key {
                        return Err(Error::KeyNotInRegion {
                            key: end,
                            region_id: self.region.id,
                            start_key: self.region.start_key.clone(),
                            end_key: self.region.end_key.clone(),
                        });
                    }
                }
                _ => return Err(Error::InvalidRequest("unknown command".into())),
            }
        }
        for r in cmd.requests {
            match CmdType::try_from(r.cmd_type) {
                Ok(CmdType::Put) => {
                    let p = r.put.expect("checked");
                    ctx.wb.put_cf(&p.cf, &p.key, &p.value)?;
                    self.written_bytes += (p.key.len() + p.value.len()) as u64;
                    self.written_keys += 1;
                }
                Ok(CmdType::Delete) => {
                    let d = r.delete.expect("checked");
                    ctx.wb.delete_cf(&d.cf, &d.key)?;
                    self.written_bytes += d.key.len() as u64;
                }
                Ok(CmdType::DeleteRange) => {
                    let d = r.delete_range.expect("checked");
                    ctx.wb.delete_range_cf(&d.cf, &d.start_key, &d.end_key)?;
                }
                _ => unreachable!("checked above"),
            }
        }
        Ok(WriteResponse::default())
    }

    fn exec_conf_change(&mut self, ctx: &mut ApplyPoller<E>, e: &Entry) -> Result<WriteResponse> {
        let cc = ConfChange::parse_from_bytes(e.get_data())?;
        let cmd: RaftCmdRequest = prost::Message::decode(cc.get_context())?;
        let header = cmd.header.clone().unwrap_or_default();
        check_epoch(&self.region, header.region_epoch.as_ref(), false, true)?;
        let cp = cmd
            .admin_request
            .and_then(|a| a.change_peer)
            .ok_or_else(|| Error::InvalidRequest("conf change without change_peer".into()))?;
        let peer = cp.peer.unwrap_or_default();
        let mut region = self.region.clone();
        match cc.get_change_type() {
            ConfChangeType::AddNode => match region.peers.iter_mut().find(|p| p.id == peer.id) {
                Some(p) => p.role = PeerRole::Voter as i32,
                None => region.peers.push(metapb::Peer {
                    role: PeerRole::Voter as i32,
                    ..peer
                }),
            },
            ConfChangeType::AddLearnerNode => {
                if region.peers.iter().any(|p| p.id == peer.id) {
                    return Err(Error::InvalidRequest(format!(
                        "peer {} already exists",
                        peer.id
                    )));
                }
                region.peers.push(metapb::Peer {
                    role: PeerRole::Learner as i32,
                    ..peer
                });
            }
            ConfChangeType::RemoveNode => {
                let before = region.peers.len();
                region.peers.retain(|p| p.id != peer.id);
                if region.peers.len() == before {
                    return Err(Error::InvalidRequest(format!(
                        "peer {} not in region",
                        peer.id
                    )));
                }
            }
        }
        let mut ep = util::epoch(&region);
        ep.conf_ver += 1;
        region.region_epoch = Some(ep);
        fail::fail_point!(crate::failpoints::APPLY_CONF_CHANGE);
        let remove_self =
            cc.get_change_type() == ConfChangeType::RemoveNode && peer.id == self.peer_id;
        let state = if remove_self {
            PeerState::Tombstone
        } else {
            PeerState::Normal
        };
        storage::write_region_state(&mut ctx.wb, &region, state)?;
        self.region = region.clone();
        self.exec_results.push(ExecResult::ChangePeer {
            cc,
            region: region.clone(),
            remove_self,
        });
        Ok(WriteResponse {
            regions: vec![region],
            ..Default::default()
        })
    }

    fn exec_split(
        &mut self,
        ctx: &mut ApplyPoller<E>,
        cmd: &RaftCmdRequest,
    ) -> Result<WriteResponse> {
        let splits = cmd
            .admin_request
            .as_ref()
            .and_then(|a| a.splits.clone())
            .ok_or_else(|| Error::InvalidRequest("split without requests".into()))?;
        let mut prev = self.region.start_key.clone();
        for s in &splits.requests {
            util::check_key_in_region(&s.split_key, &self.region)?;
            if s.split_key <= prev || s.new_peer_ids.len() != self.region.peers.len() {
                return Err(Error::InvalidRequest("invalid split request".into()));
            }
            prev = s.split_key.clone();
        }
        fail::fail_point!(crate::failpoints::APPLY_SPLIT);
        let mut ep = util::epoch(&self.region);
        ep.version += splits.requests.len() as u64;
        let mut derived = self.region.clone();
        derived.region_epoch = Some(ep);
        let mut new_regions = vec![];
        for (i, s) in splits.requests.iter().enumerate() {
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
                    ctx.wb.put_cf(
                        CF_RAFT,
                        &atoll_keys::raft_state_key(r.id),
                        &util::encode_msg(&rs),
                    )?;
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

    fn exec_compact_log(&mut self, cmd: &RaftCmdRequest) -> Result<WriteResponse> {
        let c = cmd
            .admin_request
            .as_ref()
            .and_then(|a| a.compact_log)
            .ok_or_else(|| Error::InvalidRequest("compact log without body".into()))?;
        let truncated = self.apply_state.truncated_state.unwrap_or_default();
        if c.compact_index <= truncated.index {
            return Ok(WriteResponse::default());
        }
        if c.compact_index > self.applied_index() {
            return Err(Error::InvalidRequest(
                "compaction past the applied index".into(),
            ));
        }
        self.apply_state.truncated_state = Some(RaftTruncatedState {
            index: c.compact_index,
            term: c.compact_term,
        });
        self.exec_results.push(ExecResult::CompactLog {
            index: c.compact_index,
            term: c.compact_term,
        });
        Ok(WriteResponse::default())
    }

    fn write_apply_state(&mut self, ctx: &mut ApplyPoller<E>) {
        if let Err(e) = ctx.wb.put_cf(
            CF_RAFT,
            &atoll_keys::apply_state_key(self.region_id),
            &util::encode_msg(&self.apply_state),
        ) {
            panic!("{} stage apply state: {e}", self.tag);
        }
    }

    fn gen_snapshot(&mut self, ctx: &mut ApplyPoller<E>, request: GenSnapRequest) {
        // The snapshot must include everything applied so far.
        if self.dirty {
            self.write_apply_state(ctx);
        }
        ctx.flush();
        let task = RegionTask::GenSnapshot {
            region: self.region.clone(),
            snap: ctx.ctx.engine.snapshot(),
            index: self.apply_state.applied_index,
            term: self.apply_state.applied_term,
            request,
        };
        if ctx.ctx.region_tx.send(task).is_err() {
            tracing::warn!(tag = %self.tag, "region worker gone; snapshot not generated");
        }
    }
}

pub struct ApplyPoller<E: KvEngine> {
    pub ctx: Arc<StoreContext<E>>,
    wb: E::WriteBatch,
    pending_cbs: Vec<(WriteCallback, Result<WriteResponse>)>,
    results: Vec<(u64, ApplyRes)>,
    destroyed: Vec<u64>,
    entries: u64,
}

impl<E: KvEngine> ApplyPoller<E> {
    pub fn new(ctx: Arc<StoreContext<E>>) -> Self {
        let wb = ctx.engine.write_batch();
        ApplyPoller {
            ctx,
            wb,
            pending_cbs: vec![],
            results: vec![],
            destroyed: vec![],
            entries: 0,
        }
    }

    /// Writes what is staged (unsynced) and answers the callbacks it covers.
    fn flush(&mut self) {
        if !self.wb.is_empty() {
            let wb = std::mem::replace(&mut self.wb, self.ctx.engine.write_batch());
            if let Err(e) = self.ctx.engine.write(wb, false) {
                panic!("store {}: failed to apply: {e}", self.ctx.store_id);
            }
        }
        for (cb, r) in self.pending_cbs.drain(..) {
            cb(r);
        }
    }
}

impl<E: KvEngine> PollHandler<ApplyFsm<E>> for ApplyPoller<E> {
    fn begin(&mut self, _: usize) {
        self.entries = 0;
    }

    fn handle(&mut self, fsm: &mut ApplyFsm<E>, msgs: &mut VecDeque<ApplyMsg>) {
        for m in msgs.drain(..) {
            if fsm.stopped {
                if let ApplyMsg::Apply { cbs, .. } = m {
                    for (_, _, cb) in cbs {
                        self.pending_cbs
                            .push((cb, Err(Error::RegionNotFound(fsm.region_id))));
                    }
                }
                continue;
            }
            match m {
                ApplyMsg::Apply { entries, cbs, .. } => {
                    fsm.cbs.extend(cbs);
                    fsm.apply_entries(self, entries);
                }
                ApplyMsg::Reset {
                    region,
                    apply_state,
                } => {
                    fsm.region = region;
                    fsm.apply_state = apply_state;
                    fsm.dirty = false;
                }
                ApplyMsg::GenSnapshot { request } => fsm.gen_snapshot(self, request),
                ApplyMsg::Destroy => {
                    fsm.stopped = true;
                    for (_, _, cb) in fsm.cbs.drain(..) {
                        self.pending_cbs
                            .push((cb, Err(Error::RegionNotFound(fsm.region_id))));
                    }
                    self.destroyed.push(fsm.region_id);
                }
            }
        }
        if fsm.dirty {
            fsm.write_apply_state(self);
            fsm.dirty = false;
            self.results.push((
                fsm.region_id,
                ApplyRes {
                    applied_index: fsm.apply_state.applied_index,
                    applied_term: fsm.apply_state.applied_term,
                    exec_results: std::mem::take(&mut fsm.exec_results),
                    written_bytes: std::mem::take(&mut fsm.written_bytes),
                    written_keys: std::mem::take(&mut fsm.written_keys),
                },
            ));
        }
    }

    fn end(&mut self, _batch: &mut [Box<ApplyFsm<E>>]) {
        fail::fail_point!(crate::failpoints::AFTER_APPLY_BEFORE_WRITE);
        self.flush();
        self.ctx.metrics.on_apply_round(self.entries);
        for (region_id, res) in self.results.drain(..) {
            let _ = self
                .ctx
                .router
                .force_send(region_id, PeerMsg::ApplyRes(Box::new(res)));
        }
        for region_id in self.destroyed.drain(..) {
            if let Some(mb) = self.ctx.apply_router.mailbox(region_id) {
                self.ctx.apply_router.unregister(region_id, &mb);
            }
            let _ = self
                .ctx
                .router
                .force_send(region_id, PeerMsg::ApplyDestroyed);
        }
    }
}
