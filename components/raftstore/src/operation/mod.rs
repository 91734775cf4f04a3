//! The features of a peer, one module each. Each adds its behaviour to the state types
//! ([`crate::raft::peer::Peer`], [`crate::fsm::peer::PeerFsm`], [`crate::fsm::apply::ApplyFsm`])
//! in `impl` blocks of its own: the raft side and the apply side of a feature sit together.

pub mod command;
pub mod conf_change;
pub mod hibernation;
pub mod life;
pub mod log_gc;
pub mod pd_report;
pub mod query;
pub mod ready;
pub mod snapshot;
pub mod split;
