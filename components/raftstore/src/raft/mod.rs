//! The raft state of a peer: the log and states over the engine ([`storage`]) and the peer's
//! `RawNode` with what waits on it ([`peer`]).

pub mod peer;
pub mod storage;
