//! Failpoint names of the raftstore (`fail` crate). Set them with `fail::cfg` in tests, the
//! `FAILPOINTS` environment variable, or the status server's `/fail/<name>` at run time.
//! docs/failpoints.md lists every failpoint of the project with the fault it models.

/// Before a poll round's raft write (entries, hard states) is persisted.
pub const BEFORE_PERSIST: &str = "raftstore::before_persist";
/// After a poll round's raft write is persisted, before messages that depend on it are sent.
pub const AFTER_PERSIST: &str = "raftstore::after_persist";
/// Before each committed entry is applied.
pub const BEFORE_APPLY: &str = "raftstore::before_apply";
/// After an apply round staged its writes, before they are written and answered.
pub const AFTER_APPLY_BEFORE_WRITE: &str = "raftstore::apply_before_write";
/// Inside a conf change's apply, after the new membership is computed.
pub const APPLY_CONF_CHANGE: &str = "raftstore::apply_conf_change";
/// Inside a split's apply, after validation.
pub const APPLY_SPLIT: &str = "raftstore::apply_split";
/// In snapshot generation (return an error to make it fail).
pub const SNAP_GENERATE: &str = "raftstore::snap_generate";
/// In snapshot apply on the receiver (return an error to make it fail).
pub const SNAP_APPLY: &str = "raftstore::snap_apply";
/// Before a region heartbeat is sent to PD (return to drop it).
pub const PD_REGION_HEARTBEAT: &str = "raftstore::pd_region_heartbeat";
/// Before a store heartbeat is sent to PD (return to drop it).
pub const PD_STORE_HEARTBEAT: &str = "raftstore::pd_store_heartbeat";

pub const ALL: &[&str] = &[
    BEFORE_PERSIST,
    AFTER_PERSIST,
    BEFORE_APPLY,
    AFTER_APPLY_BEFORE_WRITE,
    APPLY_CONF_CHANGE,
    APPLY_SPLIT,
    SNAP_GENERATE,
    SNAP_APPLY,
    PD_REGION_HEARTBEAT,
    PD_STORE_HEARTBEAT,
];
