//! Conf changes (one peer at a time; joint consensus is not used): checked and proposed on
//! the leader, applied on every peer (new membership and `conf_ver` written with the data, a
//! removed peer's region state marked tombstone), then taken into raft and the store's meta on
//! the raft side; a peer that removed itself is destroyed.

use crate::fsm::apply::ApplyFsm;
use crate::fsm::apply_poller::ApplyPoller;
use crate::fsm::context::StoreContext;
use crate::fsm::peer::PeerFsm;
use crate::msg::{ExecResult, WriteCallback, WriteResponse, WriteResult};
use crate::operation::command::Refused;
use crate::raft::peer::Peer;
use crate::raft::storage;
use crate::util;
use crate::{Error, Result};
use atoll_engine::KvEngine;
use atoll_proto::metapb::{self, PeerRole};
use atoll_proto::pdpb;
use atoll_proto::raft_cmdpb::{ConfChangeType as CmdConfChangeType, RaftCmdRequest};
use atoll_proto::raft_serverpb::PeerState;
use protobuf::Message as PbMessage;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry};
use std::time::Instant;

/// The command's change type for PD's (`None`: one this store does not know).
pub fn cmd_type_of_pd(pd_type: i32) -> Option<CmdConfChangeType> {
    match pdpb::ConfChangeType::try_from(pd_type).ok()? {
        pdpb::ConfChangeType::AddNode => Some(CmdConfChangeType::AddNode),
        pdpb::ConfChangeType::RemoveNode => Some(CmdConfChangeType::RemoveNode),
        pdpb::ConfChangeType::AddLearnerNode => Some(CmdConfChangeType::AddLearnerNode),
    }
}

/// Raft's change type for the command's.
pub fn raft_type_of_cmd(kind: CmdConfChangeType) -> ConfChangeType {
    match kind {
        CmdConfChangeType::AddNode => ConfChangeType::AddNode,
        CmdConfChangeType::RemoveNode => ConfChangeType::RemoveNode,
        CmdConfChangeType::AddLearnerNode => ConfChangeType::AddLearnerNode,
    }
}

impl<E: KvEngine> Peer<E> {
    /// Proposes a membership change (its epoch is checked): the entry carries the whole
    /// command as the conf change's context.
    pub(crate) fn propose_conf_change(
        &mut self,
        ctx: &StoreContext<E>,
        region: &metapb::Region,
        cmd: &RaftCmdRequest,
        cb: WriteCallback,
    ) -> std::result::Result<(), Refused> {
        let cp = cmd
            .admin_request
            .as_ref()
            .and_then(|a| a.change_peer)
            .unwrap_or_default();
        let peer = cp.peer.unwrap_or_default();
        let kind =
            CmdConfChangeType::try_from(cp.change_type).unwrap_or(CmdConfChangeType::AddNode);
        if let Err(e) = self.check_conf_change(region, kind, &peer) {
            return Err((e, cb));
        }
        let mut cc = ConfChange::default();
        cc.set_change_type(raft_type_of_cmd(kind));
        cc.node_id = peer.id;
        cc.context = prost::Message::encode_to_vec(cmd).into();
        let last = self.raft_group.raft.raft_log.last_index();
        if let Err(e) = self.raft_group.propose_conf_change(vec![], cc) {
            return Err((Error::Other(format!("propose conf change: {e}")), cb));
        }
        let proposed = self.appended_after(last, cb)?;
        // Before the entry leaves (the ready sends it later this round).
        self.block_lease_until(proposed.0);
        // The peer must be addressable before it exists anywhere.
        self.peer_cache.insert(peer.id, peer);
        ctx.metrics.on_proposal("conf_change");
        self.track_proposal(proposed);
        Ok(())
    }

    fn check_conf_change(
        &self,
        region: &metapb::Region,
        kind: CmdConfChangeType,
        peer: &metapb::Peer,
    ) -> Result<()> {
        use CmdConfChangeType as T;
        if peer.id == 0 || peer.store_id == 0 {
            return Err(Error::InvalidRequest(
                "conf change needs a peer id and a store id".into(),
            ));
        }
        if self.raft_group.raft.has_pending_conf() {
            return Err(Error::ServerIsBusy(format!(
                "region {} has a pending conf change",
                region.id
            )));
        }
        let existing = util::find_peer_by_id(region, peer.id);
        let on_store = util::find_peer(region, peer.store_id);
        match kind {
            T::AddNode | T::AddLearnerNode => {
                if let Some(p) = on_store {
                    if p.id != peer.id {
                        return Err(Error::InvalidRequest(format!(
                            "store {} already has peer {} of region {}",
                            peer.store_id, p.id, region.id
                        )));
                    }
                }
                if kind == T::AddLearnerNode && existing.is_some() {
                    return Err(Error::InvalidRequest(format!(
                        "peer {} already in region {}",
                        peer.id, region.id
                    )));
                }
                if kind == T::AddNode && existing.is_some_and(|p| !util::is_learner(p)) {
                    return Err(Error::InvalidRequest(format!(
                        "peer {} is already a voter",
                        peer.id
                    )));
                }
            }
            T::RemoveNode => {
                if existing.is_none() {
                    return Err(Error::InvalidRequest(format!(
                        "peer {} not in region {}",
                        peer.id, region.id
                    )));
                }
                if peer.id == self.meta.id {
                    return Err(Error::InvalidRequest(
                        "the leader cannot remove itself; transfer leadership first".into(),
                    ));
                }
                let voters = region.peers.iter().filter(|p| !util::is_learner(p)).count();
                if existing.is_some_and(|p| !util::is_learner(p)) && voters <= 1 {
                    return Err(Error::InvalidRequest("cannot remove the last voter".into()));
                }
            }
        }
        Ok(())
    }
}

impl<E: KvEngine> ApplyFsm<E> {
    pub(crate) fn exec_conf_change(&mut self, ctx: &mut ApplyPoller<E>, e: &Entry) -> WriteResult {
        let cc = ConfChange::parse_from_bytes(e.get_data())?;
        let cmd: RaftCmdRequest = prost::Message::decode(cc.get_context())?;
        let header = cmd.header.clone().unwrap_or_default();
        util::check_epoch(&self.region, header.region_epoch.as_ref(), false, true)?;
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
}

impl<E: KvEngine> PeerFsm<E> {
    pub(crate) fn on_conf_change(
        &mut self,
        ctx: &StoreContext<E>,
        cc: ConfChange,
        region: metapb::Region,
        remove_self: bool,
    ) {
        if let Err(e) = self.peer.raft_group.apply_conf_change(&cc) {
            tracing::error!(tag = %self.peer.tag, error = %e, "raft refused an applied conf change");
        }
        for p in &region.peers {
            self.peer.peer_cache.insert(p.id, *p);
            self.peer
                .peer_heartbeats
                .entry(p.id)
                .or_insert_with(Instant::now);
        }
        self.peer.raft_group.mut_store().region = region.clone();
        ctx.meta.lock().set_region(&region);
        self.peer.republish(ctx);
        if remove_self {
            tracing::info!(tag = %self.peer.tag, "removed from the region; destroying");
            self.start_destroy(ctx);
            return;
        }
        if self.peer.is_leader() {
            self.peer.heartbeat_pd(ctx);
        }
    }
}
