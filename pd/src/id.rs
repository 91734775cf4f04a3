//! The id allocator: ids are handed out from memory below a high-water mark persisted through
//! raft in steps; a new leader starts above the last persisted mark, so no id is ever reused.
//!
//! Ids are handed out in increasing order, whoever asks (a split, a new store, a scheduler
//! adding a peer): the stores rely on it, since a message to a peer of a region with a larger id
//! than theirs means they were replaced, and a tombstone blocks the peer ids up to its own.

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
        let epoch = self.node.status.ready_leader_epoch()?;
        let mut g = self.inner.lock().await;
        self.open(&mut g, epoch, count).await?;
        let first = g.next;
        g.next += count;
        Ok(first)
    }

    /// Makes sure `count` ids can be had from [`try_next`](Self::try_next) without persisting.
    pub async fn reserve(&self, count: u64) -> Result<(), NodeError> {
        let epoch = self.node.status.ready_leader_epoch()?;
        let mut g = self.inner.lock().await;
        self.open(&mut g, epoch, count).await
    }

    /// One id now, without waiting: from the window already persisted, in order with
    /// [`alloc`](Self::alloc). `None` when the window is used up or not set up for this
    /// leadership, or the allocator is busy persisting ([`reserve`](Self::reserve) first).
    /// For the schedulers, which pick new peers' ids synchronously.
    pub fn try_next(&self) -> Option<u64> {
        let epoch = self.node.status.ready_leader_epoch().ok()?;
        let mut g = self.inner.try_lock().ok()?;
        if g.epoch != epoch || g.next >= g.end {
            return None;
        }
        let id = g.next;
        g.next += 1;
        Some(id)
    }

    /// Sets the window up for this leadership, and persists a new high-water mark if fewer than
    /// `count` ids are left below the current one.
    async fn open(&self, g: &mut Inner, epoch: u64, count: u64) -> Result<(), NodeError> {
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
        Ok(())
    }
}

/// Ids for the schedulers, straight from the allocator (so that a peer added later always has
/// a larger id than one created earlier, e.g. by a split).
pub struct FreshIds<'a>(pub &'a IdAllocator);

impl crate::schedule::IdSource for FreshIds<'_> {
    fn next_id(&mut self) -> Option<u64> {
        self.0.try_next()
    }
}
