//! [`Latches`]: serialize write commands per key.
//!
//! Keys hash to a fixed set of slots; a command acquires the slots of all its keys before it
//! reads its snapshot and holds them until its write is applied, so two commands with an
//! overlapping key never interleave (two unrelated keys may share a slot: that only costs
//! concurrency). Slots are taken in ascending order (deduplicated), so commands cannot deadlock,
//! and each slot is a fair semaphore: waiters are served first come, first served, asleep (no
//! spinning). Acquisition is cancel-safe: dropping the future releases whatever it holds.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The latch table of a store (share it behind an `Arc`, or clone: clones share slots).
#[derive(Clone, Debug)]
pub struct Latches {
    slots: Arc<Vec<Arc<Semaphore>>>,
    mask: usize,
}

impl Latches {
    /// A table with `slots` slots, rounded up to a power of two (at least 1).
    pub fn new(slots: usize) -> Latches {
        let n = slots.max(1).next_power_of_two();
        Latches {
            slots: Arc::new((0..n).map(|_| Arc::new(Semaphore::new(1))).collect()),
            mask: n - 1,
        }
    }

    /// Number of slots.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The slot of `key`.
    pub fn slot_of(&self, key: &[u8]) -> usize {
        // DefaultHasher::new() uses fixed keys: the mapping is stable within the process.
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        (h.finish() as usize) & self.mask
    }

    /// The sorted, deduplicated slots of `keys`.
    pub fn slots_of(&self, keys: &[Vec<u8>]) -> Vec<usize> {
        let mut slots: Vec<usize> = keys.iter().map(|k| self.slot_of(k)).collect();
        slots.sort_unstable();
        slots.dedup();
        slots
    }

    /// Waits until every key's slot is free, then holds them until the guard is dropped.
    pub async fn acquire(&self, keys: &[Vec<u8>]) -> LatchGuard {
        let slots = self.slots_of(keys);
        let mut permits = Vec::with_capacity(slots.len());
        for s in &slots {
            // Invariant: the semaphores are never closed (no code path calls `close`), so
            // `acquire_owned` cannot fail.
            let permit = self.slots[*s]
                .clone()
                .acquire_owned()
                .await
                .expect("latch semaphores are never closed");
            permits.push(permit);
        }
        LatchGuard {
            slots,
            _permits: permits,
        }
    }

    /// Takes the slots of `keys` only if all are free right now.
    pub fn try_acquire(&self, keys: &[Vec<u8>]) -> Option<LatchGuard> {
        let slots = self.slots_of(keys);
        let mut permits = Vec::with_capacity(slots.len());
        for s in &slots {
            permits.push(self.slots[*s].clone().try_acquire_owned().ok()?);
        }
        Some(LatchGuard {
            slots,
            _permits: permits,
        })
    }
}

/// Holds latch slots; dropping it releases them (waking the next waiter of each).
#[derive(Debug)]
pub struct LatchGuard {
    slots: Vec<usize>,
    _permits: Vec<OwnedSemaphorePermit>,
}

impl LatchGuard {
    /// The slots held (ascending).
    pub fn slots(&self) -> &[usize] {
        &self.slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn keys(v: &[&str]) -> Vec<Vec<u8>> {
        v.iter().map(|k| k.as_bytes().to_vec()).collect()
    }

    async fn yield_a_few() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn overlapping_sets_exclude_each_other() {
        let latches = Latches::new(1024);
        let g = latches.acquire(&keys(&["a", "b"])).await;
        assert!(latches.try_acquire(&keys(&["b", "c"])).is_none());
        let l2 = latches.clone();
        let waiter = tokio::spawn(async move { l2.acquire(&keys(&["c", "b"])).await });
        yield_a_few().await;
        assert!(!waiter.is_finished(), "must wait for b");
        drop(g);
        let g2 = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(g2.slots(), &latches.slots_of(&keys(&["b", "c"]))[..]);
    }

    #[tokio::test]
    async fn disjoint_sets_are_admitted_together() {
        let latches = Latches::new(1 << 16);
        // Find two keys in different slots (almost surely the first pair).
        let a = keys(&["key-a"]);
        let mut other = None;
        for i in 0..100 {
            let k = vec![format!("key-{i}").into_bytes()];
            if latches.slots_of(&k) != latches.slots_of(&a) {
                other = Some(k);
                break;
            }
        }
        let b = other.unwrap();
        let _g1 = latches.acquire(&a).await;
        let _g2 = tokio::time::timeout(Duration::from_secs(5), latches.acquire(&b))
            .await
            .expect("disjoint keys do not wait");
        // Duplicate keys in one request do not self-deadlock.
        drop(_g2);
        let _g3 = latches.acquire(&[b[0].clone(), b[0].clone()]).await;
    }

    #[tokio::test]
    async fn fifo_per_slot() {
        let latches = Latches::new(1);
        let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let g = latches.acquire(&keys(&["x"])).await;
        let mut handles = Vec::new();
        for i in 0..5 {
            let l = latches.clone();
            let order = order.clone();
            handles.push(tokio::spawn(async move {
                let _g = l.acquire(&keys(&["x"])).await;
                order.lock().push(i);
            }));
            // On this single-threaded runtime, yielding lets waiter i queue before i + 1.
            yield_a_few().await;
        }
        drop(g);
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(*order.lock(), vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_deadlock_and_mutual_exclusion_under_load() {
        let latches = Latches::new(8);
        let inside = Arc::new(AtomicUsize::new(0));
        let counter = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for t in 0..16usize {
            let l = latches.clone();
            let inside = inside.clone();
            let counter = counter.clone();
            handles.push(tokio::spawn(async move {
                for i in 0..50usize {
                    // Every command touches "hot" plus two others, in varying order.
                    let ks = vec![
                        format!("k{}", (t + i) % 7).into_bytes(),
                        b"hot".to_vec(),
                        format!("k{}", (t * 3 + i) % 5).into_bytes(),
                    ];
                    let _g = l.acquire(&ks).await;
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        let all = async {
            for h in handles {
                h.await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .expect("no deadlock");
        assert_eq!(counter.load(Ordering::SeqCst), 16 * 50);
    }

    #[tokio::test]
    async fn cancelled_waiter_releases_nothing_it_does_not_hold() {
        let latches = Latches::new(4);
        let g = latches.acquire(&keys(&["a"])).await;
        let ka = keys(&["a"]);
        let fut = latches.acquire(&ka);
        // Poll it briefly, then drop it while it waits.
        assert!(tokio::time::timeout(Duration::from_millis(10), fut)
            .await
            .is_err());
        drop(g);
        let _g = tokio::time::timeout(Duration::from_secs(5), latches.acquire(&keys(&["a"])))
            .await
            .expect("slot is free after the cancelled waiter");
    }

    #[test]
    fn slots_round_up() {
        assert_eq!(Latches::new(0).slot_count(), 1);
        assert_eq!(Latches::new(1000).slot_count(), 1024);
        let l = Latches::new(16);
        assert_eq!(l.slots_of(&keys(&["a", "a"])).len(), 1);
    }
}
