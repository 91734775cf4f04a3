//! The apply poller: drives a batch of `ApplyFsm`s per round. Committed entries become one
//! unsynced write per round (data and applied index together; the raft log is the durable
//! record), then the callbacks it covers are answered and the results go back to the raft side.

use crate::batch::PollHandler;
use crate::fsm::apply::{ApplyFsm, ApplyMsg};
use crate::fsm::context::StoreContext;
use crate::msg::{ApplyRes, PeerMsg, WriteCallback, WriteResponse};
use crate::observer::ObservedWrite;
use crate::{Error, Result};
use atoll_engine::{KvEngine, WriteBatch};
use std::collections::VecDeque;
use std::sync::Arc;

pub struct ApplyPoller<E: KvEngine> {
    pub ctx: Arc<StoreContext<E>>,
    pub(crate) wb: E::WriteBatch,
    /// Callbacks answered once the batch that holds their entries is written.
    pub(crate) pending_cbs: Vec<(WriteCallback, Result<WriteResponse>)>,
    results: Vec<(u64, ApplyRes)>,
    destroyed: Vec<u64>,
    pub(crate) entries: u64,
    /// Writes to the `write` cf of observed regions staged in `wb` (see [`crate::observer`]).
    pub(crate) observed: Vec<ObservedWrite>,
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
            observed: vec![],
        }
    }

    /// Writes what is staged (unsynced) and answers the callbacks it covers.
    pub(crate) fn flush(&mut self) {
        let observer = (!self.observed.is_empty())
            .then(|| self.ctx.observer.get())
            .flatten();
        if let Some(o) = observer {
            o.before_write(&self.observed);
        }
        if !self.wb.is_empty() {
            let wb = std::mem::replace(&mut self.wb, self.ctx.engine.write_batch());
            if let Err(e) = self.ctx.engine.write(wb, false) {
                panic!("store {}: failed to apply: {e}", self.ctx.store_id);
            }
        }
        if let Some(o) = observer {
            o.after_write(&self.observed);
        }
        self.observed.clear();
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
                    if let Some(o) = self.ctx.observer.get() {
                        o.reset(fsm.region_id);
                    }
                }
                ApplyMsg::GenSnapshot { request } => fsm.gen_snapshot(self, request),
                ApplyMsg::Destroy => {
                    fsm.stopped = true;
                    if let Some(o) = self.ctx.observer.get() {
                        o.reset(fsm.region_id);
                    }
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
