//! [`ConcurrencyManager`]: the largest timestamp any reader has used (`max_ts`), and an
//! in-memory lock table for writes that pick their commit timestamp on the store (one-phase
//! commit, async commit, plain writes) while they are in flight.
//!
//! # Protocol
//!
//! Such a writer commits at a timestamp it computes from `max_ts`, so it must never commit at or
//! below a timestamp a reader has already read at, or the reader would miss the write (a
//! snapshot that later changes):
//!
//! 1. **Writer**: lock the keys in memory ([`ConcurrencyManager::lock_keys`]), *then* read
//!    claim a commit timestamp above it ([`ConcurrencyManager::claim_commit_ts`], and above
//!    the keys' latest commit), record it with [`MemoryLockGuard::set_commit_ts`], write (through raft), and drop
//!    the guard once the write is applied.
//! 2. **Reader** at `read_ts`: [`ConcurrencyManager::update_max_ts`]`(read_ts)`, *then* check the
//!    memory locks ([`ConcurrencyManager::check_key`] / [`ConcurrencyManager::check_range`], or
//!    wait with [`ConcurrencyManager::wait_range_clear`]), and only *then* take the snapshot.
//!
//! Either the writer read `max_ts` after the reader raised it (so `commit_ts > read_ts` and the
//! write is invisible to the read, as it must be), or the reader checks after the writer locked
//! the keys and sees the memory lock: it blocks while the commit_ts is unknown (0) or
//! `<= read_ts` (the write must be waited for and then read), and not once it is known to be
//! above `read_ts`.
//!
//! `u64::MAX` ("read the latest") is never recorded as `max_ts`: it would make every later
//! commit timestamp overflow. Such readers should read at a real timestamp (e.g. `max_ts`).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::errors::{Error, Result};

/// One writer's memory lock: shared by all its keys.
#[derive(Debug)]
struct MemoryLock {
    commit_ts: AtomicU64,
}

impl MemoryLock {
    fn blocks(&self, read_ts: u64) -> Option<u64> {
        let ts = self.commit_ts.load(Ordering::Acquire);
        (ts == 0 || ts <= read_ts).then_some(ts)
    }
}

type LockTable = BTreeMap<Vec<u8>, Vec<Arc<MemoryLock>>>;

#[derive(Debug, Default)]
struct Inner {
    max_ts: AtomicU64,
    table: Mutex<LockTable>,
    released: Notify,
}

/// Shared by every command of a store (cheap to clone).
#[derive(Clone, Debug, Default)]
pub struct ConcurrencyManager {
    inner: Arc<Inner>,
}

impl ConcurrencyManager {
    /// A manager whose `max_ts` starts at `latest_ts` (e.g. a timestamp fetched from PD at
    /// startup, so that commits after a restart stay above every read served before it).
    pub fn new(latest_ts: u64) -> Self {
        let cm = ConcurrencyManager::default();
        cm.update_max_ts(latest_ts);
        cm
    }

    /// The largest timestamp recorded by a reader.
    pub fn max_ts(&self) -> u64 {
        self.inner.max_ts.load(Ordering::SeqCst)
    }

    /// Raises `max_ts` to `ts` (monotonic; `u64::MAX` is ignored, see the module doc).
    pub fn update_max_ts(&self, ts: u64) {
        if ts != u64::MAX {
            self.inner.max_ts.fetch_max(ts, Ordering::SeqCst);
        }
    }

    /// Takes `ts` as a one-phase commit timestamp if it is above `max_ts` (every read served
    /// and every commit timestamp taken so far), recording it as the new `max_ts` in the same
    /// atomic step; `false` if it is not above. The caller passes a timestamp PD handed out to
    /// this command alone, so no two commands anywhere share one (etcd gives every txn its own
    /// revision, and its lock recipe orders waiters by them).
    pub fn claim_commit_ts(&self, ts: u64) -> bool {
        ts != u64::MAX
            && self
                .inner
                .max_ts
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |m| {
                    (m < ts).then_some(ts)
                })
                .is_ok()
    }

    /// Locks `keys` (user keys) in memory until the guard is dropped. Several guards may hold
    /// the same key (writers are serialized by latches anyway); a reader is blocked if any of
    /// them blocks it.
    pub fn lock_keys(&self, keys: &[Vec<u8>]) -> MemoryLockGuard {
        let lock = Arc::new(MemoryLock {
            commit_ts: AtomicU64::new(0),
        });
        let mut keys = keys.to_vec();
        keys.sort();
        keys.dedup();
        {
            let mut table = self.inner.table.lock();
            for k in &keys {
                table.entry(k.clone()).or_default().push(lock.clone());
            }
        }
        MemoryLockGuard {
            inner: self.inner.clone(),
            lock,
            keys,
        }
    }

    /// Whether a memory lock blocks a read of `key` at `read_ts`: the blocking writer's
    /// commit_ts (0 = not chosen yet), or `None`.
    pub fn check_key(&self, key: &[u8], read_ts: u64) -> Option<u64> {
        let table = self.inner.table.lock();
        table
            .get(key)
            .and_then(|locks| locks.iter().find_map(|l| l.blocks(read_ts)))
    }

    /// The first key in `[start, end)` (empty `end` = unbounded) whose memory lock blocks a read
    /// at `read_ts`, with the writer's commit_ts (0 = not chosen yet).
    pub fn check_range(&self, start: &[u8], end: &[u8], read_ts: u64) -> Option<(Vec<u8>, u64)> {
        self.check_range_except(start, end, read_ts, None)
    }

    /// [`ConcurrencyManager::check_range`] ignoring the memory lock of `except` (a command
    /// that both writes some keys and reads a range around them).
    pub fn check_range_except(
        &self,
        start: &[u8],
        end: &[u8],
        read_ts: u64,
        except: Option<&MemoryLockGuard>,
    ) -> Option<(Vec<u8>, u64)> {
        if !end.is_empty() && end <= start {
            return None;
        }
        let upper = if end.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(end)
        };
        let table = self.inner.table.lock();
        table
            .range::<[u8], _>((Bound::Included(start), upper))
            .find_map(|(k, locks)| {
                locks
                    .iter()
                    .filter(|l| !except.is_some_and(|g| Arc::ptr_eq(l, &g.lock)))
                    .find_map(|l| l.blocks(read_ts))
                    .map(|ts| (k.clone(), ts))
            })
    }

    /// Whether any memory lock is held on `key`.
    pub fn is_key_locked(&self, key: &[u8]) -> bool {
        self.inner.table.lock().contains_key(key)
    }

    /// Waits until no memory lock is held on `key`.
    pub async fn wait_key_released(&self, key: &[u8]) {
        loop {
            let notified = self.inner.released.notified();
            tokio::pin!(notified);
            // Register before checking, so a release between the check and the await is seen.
            notified.as_mut().enable();
            if !self.is_key_locked(key) {
                return;
            }
            notified.await;
        }
    }

    /// Waits until no memory lock in `[start, end)` blocks a read at `read_ts`, for at most
    /// `timeout`; then [`Error::MemoryLocked`] with the first blocking key.
    pub async fn wait_range_clear(
        &self,
        start: &[u8],
        end: &[u8],
        read_ts: u64,
        timeout: Duration,
    ) -> Result<()> {
        self.wait_range_clear_except(start, end, read_ts, timeout, None)
            .await
    }

    /// [`ConcurrencyManager::wait_range_clear`] ignoring the memory lock of `except`.
    pub async fn wait_range_clear_except(
        &self,
        start: &[u8],
        end: &[u8],
        read_ts: u64,
        timeout: Duration,
        except: Option<&MemoryLockGuard>,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self
                .check_range_except(start, end, read_ts, except)
                .is_none()
            {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                // One last look: the lock may have gone just now.
                return match self.check_range_except(start, end, read_ts, except) {
                    None => Ok(()),
                    Some((key, commit_ts)) => Err(Error::MemoryLocked { key, commit_ts }),
                };
            }
        }
    }

    /// Number of keys currently locked in memory.
    pub fn locked_key_count(&self) -> usize {
        self.inner.table.lock().len()
    }

    /// The smallest commit_ts among all memory locks (`0` when some writer has not chosen one
    /// yet), or `None` when none is held; for resolved-ts style computations.
    pub fn global_min_lock(&self) -> Option<u64> {
        let table = self.inner.table.lock();
        table
            .values()
            .flat_map(|v| v.iter())
            .map(|l| l.commit_ts.load(Ordering::Acquire))
            .min()
    }
}

/// Holds a writer's memory locks; dropping it releases them and wakes waiting readers.
#[derive(Debug)]
pub struct MemoryLockGuard {
    inner: Arc<Inner>,
    lock: Arc<MemoryLock>,
    keys: Vec<Vec<u8>>,
}

impl MemoryLockGuard {
    /// Records the commit timestamp the writer chose (after reading `max_ts`).
    pub fn set_commit_ts(&self, commit_ts: u64) {
        self.lock.commit_ts.store(commit_ts, Ordering::Release);
    }

    /// The recorded commit timestamp (0 = not chosen yet).
    pub fn commit_ts(&self) -> u64 {
        self.lock.commit_ts.load(Ordering::Acquire)
    }

    /// The keys held (sorted, deduplicated).
    pub fn keys(&self) -> &[Vec<u8>] {
        &self.keys
    }
}

impl Drop for MemoryLockGuard {
    fn drop(&mut self) {
        {
            let mut table = self.inner.table.lock();
            for k in &self.keys {
                if let Some(locks) = table.get_mut(k) {
                    locks.retain(|l| !Arc::ptr_eq(l, &self.lock));
                    if locks.is_empty() {
                        table.remove(k);
                    }
                }
            }
        }
        self.inner.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(v: &[&[u8]]) -> Vec<Vec<u8>> {
        v.iter().map(|k| k.to_vec()).collect()
    }

    #[test]
    fn a_commit_timestamp_is_claimed_once_and_only_above_max_ts() {
        let cm = ConcurrencyManager::new(1000);
        assert!(!cm.claim_commit_ts(1000), "not above a read");
        assert!(!cm.claim_commit_ts(5));
        assert!(cm.claim_commit_ts(1001));
        assert_eq!(cm.max_ts(), 1001);
        assert!(!cm.claim_commit_ts(1001), "claimed twice");
        assert!(!cm.claim_commit_ts(u64::MAX));
        // Concurrent claims of the same candidates: each is won by exactly one thread.
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let cm = cm.clone();
                std::thread::spawn(move || {
                    (2000..6000u64)
                        .filter(|ts| cm.claim_commit_ts(*ts))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "a timestamp claimed by two threads");
        assert_eq!(cm.max_ts(), 5999);
    }

    #[test]
    fn max_ts_is_monotonic() {
        let cm = ConcurrencyManager::new(10);
        assert_eq!(cm.max_ts(), 10);
        cm.update_max_ts(5);
        assert_eq!(cm.max_ts(), 10);
        cm.update_max_ts(20);
        assert_eq!(cm.max_ts(), 20);
        cm.update_max_ts(u64::MAX);
        assert_eq!(cm.max_ts(), 20);

        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let cm = cm.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        cm.update_max_ts(100 + t * 1000 + i);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(cm.max_ts(), 100 + 3 * 1000 + 999);
    }

    #[test]
    fn memory_locks_block_by_commit_ts() {
        let cm = ConcurrencyManager::new(0);
        let g = cm.lock_keys(&keys(&[b"b", b"a", b"b"]));
        assert_eq!(g.keys(), &keys(&[b"a", b"b"])[..]);
        assert_eq!(cm.locked_key_count(), 2);
        // Commit ts unknown: blocks every read.
        assert_eq!(cm.check_key(b"a", 1), Some(0));
        assert_eq!(cm.check_key(b"c", 1), None);
        assert_eq!(cm.check_range(b"", b"", 1), Some((b"a".to_vec(), 0)));
        assert_eq!(cm.check_range(b"a\0", b"", 1), Some((b"b".to_vec(), 0)));
        assert_eq!(cm.check_range(b"a\0", b"b", 1), None);
        assert_eq!(cm.check_range(b"b", b"a", 1), None);
        assert_eq!(cm.global_min_lock(), Some(0));
        // Commit ts 50: blocks reads at >= 50 only.
        g.set_commit_ts(50);
        assert_eq!(g.commit_ts(), 50);
        assert_eq!(cm.check_key(b"a", 49), None);
        assert_eq!(cm.check_key(b"a", 50), Some(50));
        assert_eq!(cm.check_range(b"", b"", 49), None);
        assert_eq!(cm.check_range(b"", b"", 60), Some((b"a".to_vec(), 50)));

        // A second holder of "a" with an unknown commit ts blocks again.
        let g2 = cm.lock_keys(&keys(&[b"a"]));
        assert_eq!(cm.check_key(b"a", 49), Some(0));
        drop(g2);
        assert_eq!(cm.check_key(b"a", 49), None);
        assert!(cm.is_key_locked(b"a"));
        drop(g);
        assert!(!cm.is_key_locked(b"a"));
        assert_eq!(cm.locked_key_count(), 0);
        assert_eq!(cm.global_min_lock(), None);
    }

    #[tokio::test]
    async fn waiters_wake_on_release() {
        let cm = ConcurrencyManager::new(0);
        let g = cm.lock_keys(&keys(&[b"k"]));
        let cm2 = cm.clone();
        let waiter = tokio::spawn(async move {
            cm2.wait_key_released(b"k").await;
            cm2.wait_range_clear(b"a", b"z", 100, Duration::from_secs(30))
                .await
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(g);
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("waiter woke")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn wait_range_clear_times_out_or_passes() {
        let cm = ConcurrencyManager::new(0);
        let g = cm.lock_keys(&keys(&[b"k"]));
        let err = cm
            .wait_range_clear(b"", b"", 10, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            Error::MemoryLocked {
                key: b"k".to_vec(),
                commit_ts: 0
            }
        );
        // Known commit ts above the read ts: does not block.
        g.set_commit_ts(11);
        cm.wait_range_clear(b"", b"", 10, Duration::from_millis(20))
            .await
            .unwrap();
        // Outside the range: does not block.
        cm.wait_range_clear(b"l", b"", 100, Duration::from_millis(20))
            .await
            .unwrap();
        // Blocking commit ts is released while waiting.
        let cm2 = cm.clone();
        let waiter = tokio::spawn(async move {
            cm2.wait_range_clear(b"", b"", 100, Duration::from_secs(30))
                .await
        });
        tokio::task::yield_now().await;
        drop(g);
        waiter.await.unwrap().unwrap();
        // No lock: returns at once.
        cm.wait_key_released(b"k").await;
    }
}
