//! Commands: a client's write (or an admin command) proposed on the leader, and, on the apply
//! side, committed entries executed into the apply poller's batch with their callbacks answered
//! once that batch is written. Admin commands are proposed here after their own checks (conf
//! change: [`super::conf_change`], split: [`super::split`]) and executed by their features.

use crate::fsm::apply::ApplyFsm;
use crate::fsm::apply_poller::ApplyPoller;
use crate::fsm::context::StoreContext;
use crate::msg::{WriteCallback, WriteResponse};
use crate::observer::ObservedWrite;
use crate::operation::split;
use crate::raft::peer::{Peer, Proposal};
use crate::raft::storage;
use crate::util::{self, check_epoch};
use crate::{Error, Result};
use atoll_engine::{KvEngine, WriteBatch};
use atoll_proto::raft_cmdpb::{AdminCmdType, CmdType, RaftCmdRequest, RaftRequestHeader};
use raft::eraftpb::{Entry, EntryType};
use std::time::Instant;

/// A refused proposal: the error and the callback to answer with it.
pub(crate) type Refused = (Error, WriteCallback);

impl<E: KvEngine> Peer<E> {
    pub(crate) fn check_header(
        &self,
        ctx: &StoreContext<E>,
        header: &RaftRequestHeader,
    ) -> Result<()> {
        if header.region_id != self.region_id {
            return Err(Error::RegionNotFound(header.region_id));
        }
        if let Some(p) = &header.peer {
            if p.store_id != 0 && p.store_id != ctx.store_id {
                return Err(Error::StoreNotMatch {
                    request_store_id: p.store_id,
                    actual_store_id: ctx.store_id,
                });
            }
        }
        if !self.is_initialized() {
            return Err(Error::RegionNotInitialized(self.region_id));
        }
        Ok(())
    }

    /// Proposes `cmd`; `cb` gets its result once applied, or the reason it was refused.
    pub fn propose(&mut self, ctx: &StoreContext<E>, cmd: RaftCmdRequest, cb: WriteCallback) {
        if let Err((e, cb)) = self.propose_inner(ctx, cmd, cb) {
            cb(Err(e));
        }
    }

    fn propose_inner(
        &mut self,
        ctx: &StoreContext<E>,
        cmd: RaftCmdRequest,
        cb: WriteCallback,
    ) -> std::result::Result<(), Refused> {
        let header = cmd.header.clone().unwrap_or_default();
        if self.pending_remove {
            return Err((Error::RegionNotFound(self.region_id), cb));
        }
        if let Err(e) = self.check_header(ctx, &header) {
            return Err((e, cb));
        }
        if !self.is_leader() {
            self.wake_if_asked_to_lead(ctx);
            return Err((self.not_leader(), cb));
        }
        self.wake(ctx);
        let region = self.region().clone();
        let admin = cmd
            .admin_request
            .as_ref()
            .map(|a| AdminCmdType::try_from(a.cmd_type).unwrap_or(AdminCmdType::InvalidAdmin));
        match admin {
            Some(AdminCmdType::TransferLeader) => {
                if let Err(e) = check_epoch(&region, header.region_epoch.as_ref(), true, true) {
                    return Err((e, cb));
                }
                let target = cmd
                    .admin_request
                    .and_then(|a| a.transfer_leader)
                    .and_then(|t| t.peer)
                    .unwrap_or_default();
                if util::find_peer_by_id(&region, target.id).is_none() {
                    let e = Error::InvalidRequest(format!(
                        "peer {} is not in region {}",
                        target.id, region.id
                    ));
                    return Err((e, cb));
                }
                ctx.metrics.on_proposal("transfer_leader");
                self.forbid_lease();
                self.raft_group.transfer_leader(target.id);
                cb(Ok(WriteResponse::default()));
                Ok(())
            }
            Some(AdminCmdType::ChangePeer) => {
                if let Err(e) = check_epoch(&region, header.region_epoch.as_ref(), false, true) {
                    return Err((e, cb));
                }
                self.propose_conf_change(ctx, &region, &cmd, cb)
            }
            other => {
                let is_split = other == Some(AdminCmdType::BatchSplit);
                if let Err(e) = check_epoch(&region, header.region_epoch.as_ref(), true, is_split) {
                    return Err((e, cb));
                }
                if is_split {
                    if let Err(e) = split::validate_split_cmd(&region, &cmd) {
                        return Err((e, cb));
                    }
                }
                let data = prost::Message::encode_to_vec(&cmd);
                if data.len() as u64 > ctx.cfg.raft_entry_max_size.0 {
                    let e = Error::RaftEntryTooLarge {
                        region_id: self.region_id,
                        entry_size: data.len() as u64,
                    };
                    return Err((e, cb));
                }
                let last = self.raft_group.raft.raft_log.last_index();
                if let Err(e) = self.raft_group.propose(vec![], data) {
                    let err = match e {
                        raft::Error::ProposalDropped => self.not_leader(),
                        e => Error::Other(format!("propose: {e}")),
                    };
                    return Err((err, cb));
                }
                let index = self.appended_after(last, cb)?;
                if is_split {
                    // Before the entry leaves (the ready sends it later this round).
                    self.block_lease_until(index.0);
                }
                ctx.metrics
                    .on_proposal(if other.is_some() { "admin" } else { "write" });
                self.track_proposal(index);
                Ok(())
            }
        }
    }

    /// The index of the entry just proposed with the log's last index at `last` before: none
    /// appended means raft dropped it (no longer leader).
    pub(crate) fn appended_after(
        &self,
        last: u64,
        cb: WriteCallback,
    ) -> std::result::Result<(u64, WriteCallback), Refused> {
        let index = self.raft_group.raft.raft_log.last_index();
        if index == last {
            return Err((self.not_leader(), cb));
        }
        Ok((index, cb))
    }

    /// Remembers a proposal at `index` of this term; its callback runs once it is applied.
    pub(crate) fn track_proposal(&mut self, (index, cb): (u64, WriteCallback)) {
        self.proposals.push_back(Proposal {
            index,
            term: self.term(),
            proposed_at: Instant::now(),
            cb,
        });
    }

    pub fn fail_proposals(&mut self, err: &Error) {
        for p in self.proposals.drain(..) {
            (p.cb)(Err(err.clone()));
        }
    }
}

impl<E: KvEngine> ApplyFsm<E> {
    /// Executes committed entries in order into the poller's batch (a gap is a bug: panic).
    pub(crate) fn apply_entries(&mut self, ctx: &mut ApplyPoller<E>, entries: Vec<Entry>) {
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

    /// Answers the callbacks up to `index`: the one proposed at (`index`, `term`) with
    /// `result`, any older or of another term as stale (their entries were replaced).
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
            let (what, key, end) = match CmdType::try_from(r.cmd_type) {
                Ok(CmdType::Put) => ("put", r.put.as_ref().map(|p| &p.key), None),
                Ok(CmdType::Delete) => ("delete", r.delete.as_ref().map(|d| &d.key), None),
                Ok(CmdType::DeleteRange) => {
                    let d = r.delete_range.as_ref();
                    (
                        "delete range",
                        d.map(|d| &d.start_key),
                        d.map(|d| &d.end_key),
                    )
                }
                _ => return Err(Error::InvalidRequest("unknown command".into())),
            };
            let key = key.ok_or_else(|| Error::InvalidRequest(format!("{what} without body")))?;
            util::check_key_in_region(&util::user_key_of(key)?, &self.region)?;
            if let Some(end) = end {
                let end = util::user_key_of(end)?;
                if !util::end_within_region(&end, &self.region) {
                    return Err(util::key_not_in_region(end, &self.region));
                }
            }
        }
        let observed = ctx
            .ctx
            .observer
            .get()
            .is_some_and(|o| o.observes(self.region_id));
        for r in cmd.requests {
            match CmdType::try_from(r.cmd_type) {
                Ok(CmdType::Put) => {
                    let p = r.put.expect("checked");
                    ctx.wb.put_cf(&p.cf, &p.key, &p.value)?;
                    if observed && p.cf == atoll_engine::CF_WRITE {
                        ctx.observed.push(ObservedWrite {
                            region_id: self.region_id,
                            key: p.key.clone(),
                            value: p.value.clone(),
                        });
                    }
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

    /// Stages the apply state (applied index, truncated state) into the poller's batch, with
    /// the data it covers.
    pub(crate) fn write_apply_state(&mut self, ctx: &mut ApplyPoller<E>) {
        if let Err(e) = storage::write_apply_state(&mut ctx.wb, self.region_id, &self.apply_state) {
            panic!("{} stage apply state: {e}", self.tag);
        }
    }
}
