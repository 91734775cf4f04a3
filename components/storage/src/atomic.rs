//! Atomic commands on one region at one timestamp: a decision over a consistent snapshot of
//! the region and its one-phase commit, both at the same timestamp `ts`. The etcd API runs
//! its Put, DeleteRange and Txn this way when everything they touch lies in one region.
//!
//! The protocol, for a command that writes `keys` (latched, locked in memory) and reads those
//! keys and some `ranges`:
//!
//! 1. Latch the keys; lock them in memory; pick `ts = max(max_ts, start_ts) + 1` and record it
//!    as the commit timestamp of the memory lock; raise `max_ts` to `ts`. From now on no other
//!    one-phase writer commits at or below `ts`, and readers at or above `ts` wait for us.
//!    `start_ts` is a timestamp PD handed out after the command began, so `ts` is above the
//!    revision of every answer given before the command began.
//! 2. Wait out the other writers' memory locks at or below `ts` on the keys and ranges read:
//!    every write below `ts` is then either applied or a Percolator lock (which a read meets
//!    and reports, for the caller to resolve).
//! 3. Decide on the leader's snapshot at `ts` (what `ts` excludes: our own writes, and later
//!    commits). A decision that writes nothing is confirmed like any such answer
//!    ([`Storage::decide_on_leader`]); the revision it reports is `ts`.
//! 4. A decision that writes a key not latched starts again with that key latched too (all
//!    latches are taken at once, in order: no deadlock). A written key whose newest version is
//!    at or above `ts` (a Percolator commit that took a later timestamp from PD) starts again
//!    above it.
//! 5. Write every key at `ts` in one phase (with etcd's key metadata) and propose, releasing
//!    latches and memory lock only once applied.
//! 6. Answer only once PD has handed out a timestamp at or above `ts`
//!    ([`Storage::commit_wait`], overlapping the proposal), so that every read that begins
//!    after the answer reads at or above `ts`: revisions follow real time.
//!
//! `start_ts` identifies the command: a retry of one already applied finds its records (on the
//! keys it latches or writes, even if the retry would now write nothing) and is answered again,
//! decided anew on the snapshot just below its commit (its reads are the same). A key it only
//! deleted through a range, and latched only once found, is not looked at when the retry
//! finds nothing to delete.

use crate::storage::*;
use atoll_engine::KvEngine;
use atoll_proto::kvrpcpb::Context;
use atoll_proto::metapb;
use atoll_txn::{MvccReader, MvccTxn, TxnCommitRecord, WriteType};
use std::time::Duration;

/// How long an atomic command waits for other writers' memory locks on what it reads.
const MEMORY_LOCK_WAIT: Duration = Duration::from_secs(2);

/// One key an atomic command writes: a value (attached to `lease`, 0 for none) or a delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AtomicWrite {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub lease: u64,
}

/// What an atomic command's decision sees: the region's data as of `ts`.
pub struct AtomicView<'a, S: atoll_engine::Snapshot> {
    pub reader: MvccReader<S>,
    /// The snapshot timestamp, and the commit timestamp if the decision writes.
    pub ts: u64,
    pub region: &'a metapb::Region,
    /// The raft term of the leadership the decision is made under: its writes commit only
    /// if this leadership (or a successor that applies them) does.
    pub term: u64,
    /// Transactions whose locks the reads may ignore (the caller resolved them).
    pub bypass_locks: &'a [u64],
}

/// The outcome of an atomic command.
#[derive(Debug)]
pub struct Atomic<T> {
    /// The commit timestamp if it wrote, else the snapshot timestamp.
    pub revision: u64,
    pub wrote: bool,
    pub out: T,
}

impl<E: KvEngine> Storage<E> {
    /// Runs `decide` atomically on the region of `ctx` (see the module doc). `keys` are the
    /// keys the command may write (more are latched if it turns out to write others);
    /// `ranges` the ranges it reads besides them. `decide` may run more than once.
    pub async fn atomic<T, D>(
        &self,
        ctx: &Context,
        start_ts: u64,
        keys: &[Vec<u8>],
        ranges: &[(Vec<u8>, Vec<u8>)],
        mut decide: D,
    ) -> Result<Atomic<T>, Fail>
    where
        D: FnMut(&AtomicView<'_, E::Snapshot>) -> Result<(Vec<AtomicWrite>, T), Fail>,
    {
        if start_ts == 0 {
            return Err(abort(
                "atomic commands need a start_version (a fresh timestamp)",
            ));
        }
        let first = self.write_snapshot(ctx)?;
        for (s, e) in ranges {
            check_range_in_region(s, e, &first.region)?;
        }
        self.ensure_max_ts_synced(first.region.id, first.term)
            .await?;
        let mut keys = keys.to_vec();
        keys.sort();
        keys.dedup();
        let mut newest = 0;
        loop {
            let latch = self.latches.acquire(&keys).await;
            let mem = self.cm.lock_keys(&keys);
            let ts = self.one_pc_commit_ts(start_ts, newest, true).await?;
            mem.set_commit_ts(ts);
            let point_ranges = keys.iter().map(|k| {
                let mut end = k.clone();
                end.push(0);
                (k.clone(), end)
            });
            for (s, e) in point_ranges.chain(ranges.iter().cloned()) {
                self.cm
                    .wait_range_clear_except(&s, &e, ts, MEMORY_LOCK_WAIT, Some(&mem))
                    .await
                    .map_err(|_| {
                        Fail::region(atoll_raftstore::Error::ServerIsBusy(
                            "writes in flight on the keys read".into(),
                        ))
                    })?;
            }
            let bypass = ctx.resolved_locks.clone();
            let (snap, (writes, out)) = self
                .decide_on_leader(ctx, &keys, |snap| {
                    for (s, e) in ranges {
                        check_range_in_region(s, e, &snap.region)?;
                    }
                    let view = AtomicView {
                        reader: MvccReader::new(snap.snap.clone()),
                        ts,
                        region: &snap.region,
                        term: snap.term,
                        bypass_locks: &bypass,
                    };
                    let (writes, out) = decide(&view)?;
                    let some = !writes.is_empty();
                    Ok(((writes, out), some))
                })
                .await?;
            let reader = MvccReader::new(snap.snap.clone());
            // A retry of a command that was applied: its answer, as decided then. Its records
            // are on the keys it wrote: latched (the retry may now decide to write nothing, its
            // own writes having changed what it reads), or written again now.
            let written = keys.iter().chain(writes.iter().map(|w| &w.key));
            if let Some(done) = self.already_applied(&reader, written, start_ts)? {
                let view = AtomicView {
                    reader,
                    ts: done - 1,
                    region: &snap.region,
                    term: snap.term,
                    bypass_locks: &bypass,
                };
                let (_, out) = decide(&view)?;
                self.commit_wait(done, start_ts).await?;
                return Ok(Atomic {
                    revision: done,
                    wrote: true,
                    out,
                });
            }
            if writes.is_empty() {
                self.commit_wait(ts, start_ts).await?;
                return Ok(Atomic {
                    revision: ts,
                    wrote: false,
                    out,
                });
            }
            let unlatched: Vec<Vec<u8>> = writes
                .iter()
                .filter(|w| keys.binary_search(&w.key).is_err())
                .map(|w| w.key.clone())
                .collect();
            if !unlatched.is_empty() {
                drop((latch, mem));
                keys.extend(unlatched);
                keys.sort();
                keys.dedup();
                continue;
            }
            for w in &writes {
                newest = newest.max(reader.latest_commit_ts(&w.key)?.unwrap_or(0));
            }
            if newest >= ts {
                continue;
            }
            let mut txn = MvccTxn::new(start_ts);
            for w in writes {
                atoll_txn::plain_write(&mut txn, &reader, &w.key, w.value, w.lease, ts)?;
            }
            let (proposed, waited) = tokio::join!(
                self.propose(ctx, &snap.region, txn.into_modifies(), (latch, mem)),
                self.commit_wait(ts, start_ts)
            );
            proposed?;
            waited?;
            return Ok(Atomic {
                revision: ts,
                wrote: true,
                out,
            });
        }
    }

    /// The commit timestamp of command `start_ts` if it already wrote one of `keys`.
    fn already_applied<'k>(
        &self,
        reader: &MvccReader<E::Snapshot>,
        keys: impl Iterator<Item = &'k Vec<u8>>,
        start_ts: u64,
    ) -> Result<Option<u64>, Fail> {
        for k in keys {
            if let TxnCommitRecord::SingleRecord { commit_ts, write } =
                reader.get_txn_commit_record(k, start_ts)?
            {
                if write.write_type != WriteType::Rollback {
                    return Ok(Some(commit_ts));
                }
            }
        }
        Ok(None)
    }
}

/// A range an atomic command reads must lie in its region (empty end = unbounded).
fn check_range_in_region(start: &[u8], end: &[u8], r: &metapb::Region) -> Result<(), Fail> {
    if !atoll_keys::in_range(start, &r.start_key, &r.end_key) {
        return Err(key_not_in_region(start, r));
    }
    let past_region = if end.is_empty() {
        !r.end_key.is_empty()
    } else {
        !r.end_key.is_empty() && end > r.end_key.as_slice()
    };
    if past_region {
        return Err(key_not_in_region(end, r));
    }
    Ok(())
}
