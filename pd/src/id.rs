//! The id allocator: ids are handed out from memory below a high-water mark persisted through
//! raft in steps; a new leader starts above the last persisted mark, so no id is ever reused.

use crate::raft_node::{NodeError, RaftNode};
use crate::state::{u64_value, KEY_ID_HWM};
use atoll_proto::pdpb::{PdCommand, PdKv};
use std::sync::Arc;
use tokio::sync::Mutex;

const STEP: u64 = 1000;

#[derive(Default)]
struct Inner {
    epoch: u64,
    next: u64,
    end: u64,
}

pub struct IdAllocator {
    node: Arc<RaftNode>,
    inner: Mutex<Inner>,
}

impl IdAllocator {
    pub fn new(node: Arc<RaftNode>) -> Self {
        IdAllocator {
            node,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// `count` consecutive fresh ids; returns the first.
    pub async fn alloc(&self, count: u32) -> Result<u64, NodeError> {
        let count = count.max(1) as u64;
        let epoch = self
            .node
            .status
            .leader_epoch
            .load(std::sync::atomic::Ordering::Acquire);
        if !self.node.status.is_ready_leader() {
            return Err(NodeError::NotLeader);
        }
        let mut g = self.inner.lock().await;
        if g.epoch != epoch {
            let hwm = self.node.state.read().id_hwm;
            *g = Inner {
                epoch,
                next: hwm.max(1) + 1,
                end: hwm.max(1) + 1,
            };
        }
        if g.next + count > g.end {
            let new_end = g.next + count + STEP;
            let cmd = PdCommand {
                puts: vec![PdKv {
                    key: KEY_ID_HWM.to_vec(),
                    value: u64_value(new_end),
                }],
                deletes: vec![],
            };
            self.node.propose(cmd).await?;
            g.end = new_end;
        }
        let first = g.next;
        g.next += count;
        Ok(first)
    }
}
