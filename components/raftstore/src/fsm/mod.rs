//! The runtime glue: the FSMs of a region's raft and apply sides, the context every thread
//! shares, the two pollers that drive the FSMs round by round, and the store that wires them
//! to threads.

pub mod apply;
pub mod apply_poller;
pub mod context;
pub mod peer;
pub mod raft_poller;
pub mod store;
