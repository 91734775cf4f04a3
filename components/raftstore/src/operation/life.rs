//! A peer's life: created (from persisted states at start, by a split, or uninitialized for
//! a message naming a peer this store does not have, waiting for a snapshot), registered with
//! the store's routers in one place, told it is stale or removed, and destroyed: tombstone,
//! raft state and data deletion staged into the round's write, the range freed only after it.

use crate::fsm::apply::{ApplyFsm, ApplyMsg};
use crate::fsm::context::StoreContext;
use crate::fsm::peer::PeerFsm;
use crate::msg::{CasualMessage, PeerMsg, StoreMsg};
use crate::raft::peer::Peer;
use crate::raft::storage;
use crate::{util, Error, Result};
use atoll_engine::{KvEngine, WriteBatch, DATA_CFS};
use atoll_proto::metapb;
use atoll_proto::raft_serverpb::{PeerState, RaftMessage};
use protobuf::Message as PbMessage;
use raft::eraftpb::MessageType;
use std::sync::Arc;

/// Creates and starts an initialized peer whose states are already in the engine, and hands
/// it the messages parked for it.
pub fn create_peer<E: KvEngine>(
    ctx: &StoreContext<E>,
    region: metapb::Region,
    peer: metapb::Peer,
    campaign: bool,
) -> Result<()> {
    let region_id = region.id;
    let mut fsm = PeerFsm::create(ctx, region, peer)?;
    fsm.peer.campaign_on_start = campaign;
    register_peer(ctx, fsm, true);
    ctx.deliver_parked(region_id);
    Ok(())
}

/// Creates a peer from persisted states while the store loads (started with every other once
/// the pollers run).
pub fn load_peer<E: KvEngine>(
    ctx: &StoreContext<E>,
    region: metapb::Region,
    peer: metapb::Peer,
) -> Result<()> {
    let fsm = PeerFsm::create(ctx, region, peer)?;
    register_peer(ctx, fsm, false);
    Ok(())
}

/// Creates and starts a peer that exists only because a message named it (it waits for a
/// snapshot).
fn create_uninitialized_peer<E: KvEngine>(
    ctx: &StoreContext<E>,
    region_id: u64,
    peer: metapb::Peer,
) -> Result<()> {
    let region = metapb::Region {
        id: region_id,
        ..Default::default()
    };
    let fsm = PeerFsm::create(ctx, region, peer)?;
    register_peer(ctx, fsm, true);
    Ok(())
}

/// The one place a peer becomes reachable: its FSM and its apply side registered with the
/// store's routers (apply first: the raft side may hand it entries at once), then started.
fn register_peer<E: KvEngine>(ctx: &StoreContext<E>, fsm: Box<PeerFsm<E>>, start: bool) {
    let region = fsm.peer.region().clone();
    let region_id = region.id;
    let apply_state = fsm.peer.raft_group.store().apply_state;
    ctx.apply_router.register(
        region_id,
        ApplyFsm::new(region, fsm.peer.meta.id, apply_state),
    );
    ctx.router.register(region_id, fsm);
    if start {
        let _ = ctx.router.force_send(region_id, PeerMsg::Start);
    }
}

/// Removes what a destroyed peer may have left behind (a crash mid-destroy).
pub fn clean_tombstone<E: KvEngine>(ctx: &StoreContext<E>, region: &metapb::Region) -> Result<()> {
    if storage::load_raft_state(&ctx.engine, region.id)?.is_none() {
        return Ok(());
    }
    storage::clear_raft_state(&ctx.engine, region.id, false)
}

impl<E: KvEngine> PeerFsm<E> {
    /// A peer from persisted (or freshly written) states; an uninitialized one for a region
    /// with no peers.
    pub fn create(
        ctx: &StoreContext<E>,
        region: metapb::Region,
        meta: metapb::Peer,
    ) -> Result<Box<Self>> {
        let peer = Peer::new(&ctx.cfg, ctx.engine.clone(), &ctx.logger, region, meta)?;
        Ok(PeerFsm::new(peer))
    }

    pub(crate) fn on_raft_message(&mut self, ctx: &StoreContext<E>, msg: RaftMessage) {
        let to = msg.to_peer.unwrap_or_default();
        let from = msg.from_peer.unwrap_or_default();
        if to.id != self.peer.meta.id {
            // A newer peer of this region was placed on this store: this one is stale. Only a
            // sender that knows a newer membership than ours can say so (a stale member still
            // addressing an old peer of this store must not make the current one go away).
            let newer_epoch = msg.region_epoch.unwrap_or_default().conf_ver
                > util::epoch(self.peer.region()).conf_ver;
            if to.id > self.peer.meta.id && newer_epoch {
                tracing::info!(tag = %self.peer.tag, newer = to.id, "replaced by a newer peer; destroying");
                self.start_destroy(ctx);
            } else {
                ctx.metrics.on_dropped("stale_target_peer");
            }
            return;
        }
        let msg_epoch = msg.region_epoch.unwrap_or_default();
        if msg.is_tombstone {
            // The sender (with a newer epoch) says this peer was removed.
            let cur = util::epoch(self.peer.region());
            if !self.peer.is_initialized() || msg_epoch.conf_ver > cur.conf_ver {
                tracing::info!(tag = %self.peer.tag, "told it is removed; destroying");
                self.start_destroy(ctx);
            }
            return;
        }
        if self.peer.is_initialized()
            && util::find_peer_by_id(self.peer.region(), from.id).is_none()
        {
            let cur = util::epoch(self.peer.region());
            if util::is_epoch_stale(&msg_epoch, &cur) {
                // The sender was removed and does not know it: tell it.
                self.send_tombstone(ctx, &msg);
                return;
            }
        }
        if msg.extra != 0 {
            self.peer.on_extra_message(ctx, &msg);
            return;
        }
        if let Err(e) = self.peer.step(ctx, msg) {
            tracing::warn!(tag = %self.peer.tag, error = %e, "bad raft message");
        }
    }

    fn send_tombstone(&self, ctx: &StoreContext<E>, msg: &RaftMessage) {
        let gc = RaftMessage {
            to_peer: msg.from_peer,
            is_tombstone: true,
            ..self.peer.raft_message_to(msg.from_peer.unwrap_or_default())
        };
        ctx.trans.send(gc);
    }

    /// PD says this peer is no longer a member (as of `region`).
    pub(crate) fn on_stale_peer(&mut self, ctx: &StoreContext<E>, region: metapb::Region) {
        let cur = util::epoch(self.peer.region());
        let theirs = util::epoch(&region);
        let member = util::find_peer_by_id(&region, self.peer.meta.id).is_some();
        if !member && (theirs.conf_ver > cur.conf_ver || !self.peer.is_initialized()) {
            tracing::info!(tag = %self.peer.tag, "PD says this peer is stale; destroying");
            self.start_destroy(ctx);
        }
    }

    pub(crate) fn start_destroy(&mut self, ctx: &StoreContext<E>) {
        if self.peer.pending_remove {
            return;
        }
        self.peer.pending_remove = true;
        self.peer.clear_apply_pending(ctx);
        let err = Error::RegionNotFound(self.region_id());
        self.peer.fail_proposals(&err);
        self.peer.fail_reads(&err);
        ctx.set_awake(self.region_id(), false);
        ctx.meta.lock().readers.remove(&self.region_id());
        if ctx
            .apply_router
            .force_send(self.region_id(), ApplyMsg::Destroy)
            .is_err()
        {
            let _ = ctx
                .router
                .force_send(self.region_id(), PeerMsg::ApplyDestroyed);
        }
    }

    /// Stages the tombstone, the raft state's deletion and (if no other region here covers
    /// any of it) the data's deletion into the round's write batch. The range stays claimed in
    /// the store's meta until [`Self::complete_destroy`], after that batch is written: a
    /// snapshot of an overlapping region can only be accepted once the deletion is on disk,
    /// never be wiped by it.
    pub(crate) fn finish_destroy(&mut self, ctx: &StoreContext<E>, wb: &mut E::WriteBatch) {
        if self.stopped {
            return;
        }
        let region = self.peer.region().clone();
        let region_id = self.region_id();
        let initialized = self.peer.is_initialized();
        let res: atoll_engine::Result<()> = (|| {
            let mut tomb = region.clone();
            if !initialized {
                tomb.id = region_id;
            }
            storage::write_region_state(wb, &tomb, PeerState::Tombstone)?;
            storage::delete_raft_state(wb, region_id)?;
            let meta = ctx.meta.lock();
            if initialized
                && meta
                    .overlapping(&region.start_key, &region.end_key, region_id)
                    .is_empty()
            {
                let (s, e) = util::data_bounds(&region);
                for cf in DATA_CFS {
                    wb.delete_range_cf(cf, &s, &e)?;
                }
            }
            Ok(())
        })();
        if let Err(e) = res {
            tracing::error!(tag = %self.peer.tag, error = %e, "stage destroy");
        }
        self.stopped = true;
        self.destroy_staged = true;
    }

    /// After the round's write: frees the range, forgets the peer, and lets the store retry
    /// messages that waited for the range.
    pub(crate) fn complete_destroy(&mut self, ctx: &StoreContext<E>) {
        if !std::mem::take(&mut self.destroy_staged) {
            return;
        }
        let region_id = self.region_id();
        {
            let mut meta = ctx.meta.lock();
            if meta.regions.contains_key(&region_id) {
                meta.remove_region(region_id);
            }
            meta.readers.remove(&region_id);
        }
        if let Some(mb) = ctx.router.mailbox(region_id) {
            ctx.router.unregister(region_id, &mb);
        }
        ctx.send_store_msg(StoreMsg::PeerDestroyed { region_id });
        tracing::info!(tag = %self.peer.tag, "destroyed");
    }
}

/// Parked messages whose range is now free create their peers.
pub fn retry_parked<E: KvEngine>(ctx: &Arc<StoreContext<E>>) {
    let ids: Vec<u64> = ctx.meta.lock().parked_msgs.keys().copied().collect();
    for id in ids {
        if ctx.router.mailbox(id).is_some() {
            ctx.deliver_parked(id);
            continue;
        }
        let msgs = ctx.meta.lock().take_parked(id);
        for m in msgs {
            maybe_create_peer(ctx, m);
        }
    }
}

fn may_create_region(msg: &RaftMessage) -> bool {
    if msg.extra != 0 || msg.is_tombstone {
        return false;
    }
    match raft::eraftpb::Message::parse_from_bytes(&msg.message) {
        Ok(m) => matches!(
            m.get_msg_type(),
            MessageType::MsgRequestVote
                | MessageType::MsgRequestPreVote
                | MessageType::MsgAppend
                | MessageType::MsgHeartbeat
                | MessageType::MsgSnapshot
        ),
        Err(_) => false,
    }
}

pub fn maybe_create_peer<E: KvEngine>(ctx: &Arc<StoreContext<E>>, msg: RaftMessage) {
    let region_id = msg.region_id;
    let Some(to) = msg.to_peer else {
        return;
    };
    if to.store_id != ctx.store_id {
        ctx.metrics.on_dropped("store_not_match");
        return;
    }
    if ctx.router.mailbox(region_id).is_some() {
        let _ = ctx
            .router
            .force_send(region_id, PeerMsg::RaftMessage(Box::new(msg)));
        return;
    }
    if !may_create_region(&msg) {
        ctx.metrics.on_dropped("region_not_found");
        return;
    }
    // A tombstone blocks its own (and older) peers from coming back.
    match storage::load_region_state(&ctx.engine, region_id) {
        Ok(Some(s)) if s.state == PeerState::Tombstone as i32 => {
            let tomb = s.region.unwrap_or_default();
            let tomb_epoch = util::epoch(&tomb);
            let msg_epoch = msg.region_epoch.unwrap_or_default();
            let tomb_peer = util::find_peer(&tomb, ctx.store_id).map_or(0, |p| p.id);
            // A peer placed here again after the removal comes with a newer membership than the
            // tombstone's; anything else is from the past (e.g. a member that missed the removal
            // still addressing the removed peer) and must not bring it back as a zombie voter of
            // the old membership. (After removing itself the tombstone's region no longer names
            // this store, so the peer id alone cannot tell.)
            if msg_epoch.conf_ver <= tomb_epoch.conf_ver || to.id <= tomb_peer {
                ctx.metrics.on_dropped("tombstone");
                return;
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(region_id, error = %e, "load region state");
            return;
        }
    }
    {
        let mut meta = ctx.meta.lock();
        if meta.regions.contains_key(&region_id) {
            // Known here without a peer yet: a split being applied on this store is creating
            // it (it registers the range first). Hand the message over once the peer exists.
            meta.park_msg(msg);
            drop(meta);
            if ctx.router.mailbox(region_id).is_some() {
                ctx.deliver_parked(region_id);
            }
            return;
        }
        let overlaps = meta.overlapping(&msg.start_key, &msg.end_key, region_id);
        if !overlaps.is_empty() {
            // Most likely a split not yet applied here: keep the message for a while.
            meta.park_msg(msg);
            drop(meta);
            for id in overlaps {
                let _ = ctx
                    .router
                    .force_send(id, PeerMsg::Casual(CasualMessage::HeartbeatPd));
            }
            return;
        }
    }
    if let Err(e) = create_uninitialized_peer(ctx, region_id, to) {
        tracing::error!(region_id, error = %e, "create peer");
        return;
    }
    let _ = ctx
        .router
        .force_send(region_id, PeerMsg::RaftMessage(Box::new(msg)));
}
