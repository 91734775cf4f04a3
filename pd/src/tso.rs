//! The timestamp oracle. Timestamps are `physical_ms << 18 | logical`, strictly increasing
//! across leader changes: a leader first persists (through raft) a window end `W` ahead of its
//! clock and serves only timestamps with physical part `< W`; a new leader starts at or after
//! the previous leader's persisted window end, so it can never go back.

use crate::raft_node::{NodeError, RaftNode};
use crate::state::{u64_value, KEY_TSO};
use atoll_proto::pdpb::{PdCommand, PdKv};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

pub const MAX_LOGICAL: i64 = 1 << 18;

#[derive(Default)]
struct Inner {
    /// The leadership epoch this state was initialised for (0 = never).
    epoch: u64,
    physical: i64,
    logical: i64,
    /// Persisted window end (ms): physical parts served are below it.
    window_end: i64,
}

pub struct Tso {
    node: Arc<RaftNode>,
    save_interval: Duration,
    inner: Mutex<Inner>,
}

fn now_ms() -> i64 {
    atoll_util::unix_millis() as i64
}

impl Tso {
    pub fn new(node: Arc<RaftNode>, save_interval: Duration) -> Self {
        Tso {
            node,
            save_interval,
            inner: Mutex::new(Inner::default()),
        }
    }

    async fn save_window(&self, end: i64) -> Result<(), NodeError> {
        fail::fail_point!("pd::tso_save", |_| Err(NodeError::Dropped(
            "failpoint pd::tso_save".into()
        )));
        let cmd = PdCommand {
            puts: vec![PdKv {
                key: KEY_TSO.to_vec(),
                value: u64_value(end as u64),
            }],
            deletes: vec![],
        };
        self.node.propose(cmd).await
    }

    /// Allocates `count` timestamps; returns (physical, last logical).
    pub async fn alloc(&self, count: u32) -> Result<(i64, i64), NodeError> {
        fail::fail_point!("pd::tso_alloc", |_| Err(NodeError::Dropped(
            "failpoint pd::tso_alloc".into()
        )));
        let count = count.max(1) as i64;
        if count >= MAX_LOGICAL {
            return Err(NodeError::Dropped(format!(
                "cannot allocate {count} timestamps at once"
            )));
        }
        let epoch = self.node.status.ready_leader_epoch()?;
        let mut g = self.inner.lock().await;
        if g.epoch != epoch {
            // New leadership: continue strictly after everything a previous leader could have
            // served (its persisted window end), and persist our own window first.
            let persisted = self.node.state.read().tso_window_end_ms;
            let start = now_ms().max(persisted).max(g.physical + 1);
            let end = start + self.save_interval.as_millis() as i64;
            self.save_window(end).await?;
            *g = Inner {
                epoch,
                physical: start,
                logical: 0,
                window_end: end,
            };
        }
        let now = now_ms();
        if now > g.physical {
            g.physical = now;
            g.logical = 0;
        }
        if g.logical + count >= MAX_LOGICAL {
            g.physical += 1;
            g.logical = 0;
        }
        if g.physical >= g.window_end {
            let end = g.physical.max(now) + self.save_interval.as_millis() as i64;
            self.save_window(end).await?;
            g.window_end = end;
        }
        // Keep the window comfortably ahead so that saving is rarely on the path.
        if g.window_end - g.physical < self.save_interval.as_millis() as i64 / 3 {
            let end = g.physical + self.save_interval.as_millis() as i64;
            self.save_window(end).await?;
            g.window_end = end;
        }
        g.logical += count;
        // Leadership must still hold (a quorum confirms) before answering.
        self.node.read_index().await?;
        if self
            .node
            .status
            .leader_epoch
            .load(std::sync::atomic::Ordering::Acquire)
            != epoch
        {
            return Err(NodeError::NotLeader);
        }
        Ok((g.physical, g.logical - 1))
    }
}
