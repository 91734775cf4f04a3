//! `PeerFsm`: one region's peer as a batch-system FSM. The state only; the raft poller
//! ([`crate::fsm::raft_poller`]) feeds it messages, and the features in [`crate::operation`]
//! act on it.

use crate::batch::Fsm;
use crate::msg::PeerMsg;
use crate::raft::peer::Peer;
use atoll_engine::KvEngine;

pub struct PeerFsm<E: KvEngine> {
    pub peer: Peer<E>,
    pub(crate) stopped: bool,
    /// A destroy is staged in the round's write batch; completed after the write.
    pub(crate) destroy_staged: bool,
}

impl<E: KvEngine> Fsm for PeerFsm<E> {
    type Message = PeerMsg<E>;
    fn is_stopped(&self) -> bool {
        self.stopped
    }
    fn needs_poll(&self) -> bool {
        self.peer.needs_poll()
    }
}

impl<E: KvEngine> PeerFsm<E> {
    pub fn new(peer: Peer<E>) -> Box<Self> {
        Box::new(PeerFsm {
            peer,
            stopped: false,
            destroy_staged: false,
        })
    }

    pub fn region_id(&self) -> u64 {
        self.peer.region_id
    }
}
