//! Store-level liveness: when each other store was last heard from.
//!
//! Every batch that arrives from a store counts, keep-alives included (the transport sends an
//! empty batch on every idle connection each second), so a store is heard from whether or not
//! any of the regions it shares with this one are awake. Sleeping regions take their peers'
//! liveness from here, never from per-peer timestamps that stop moving while they sleep:
//! - a leader may hibernate although a follower is silent, if that follower's store is down
//!   and a quorum is up to date without it;
//! - a sleeping leader reports a follower as down to PD only when its store is down.
//!
//! A store turns *down* when it has not been heard from for `store-liveness-timeout`, or when
//! the transport cannot reach it; it turns *up* again with the next batch from it. Only these
//! transitions cause work (the store thread wakes the followers whose leader was there), so a
//! store that stays down costs nothing.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Entry {
    last_heard: Instant,
    /// Since when the store is taken as down (`None`: up).
    down_since: Option<Instant>,
}

/// A transition of one store, for the store thread to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Down(u64),
    Up(u64),
}

#[derive(Debug)]
pub struct StoreLiveness {
    timeout: Duration,
    stores: Mutex<HashMap<u64, Entry>>,
}

impl StoreLiveness {
    pub fn new(timeout: Duration) -> Self {
        StoreLiveness {
            timeout,
            stores: Mutex::new(HashMap::new()),
        }
    }

    /// A batch (or keep-alive) arrived from `store_id`. Returns `Up` if it was down.
    pub fn heard(&self, store_id: u64, now: Instant) -> Option<Transition> {
        let mut s = self.stores.lock();
        let e = s.entry(store_id).or_insert(Entry {
            last_heard: now,
            down_since: None,
        });
        e.last_heard = e.last_heard.max(now);
        e.down_since.take().map(|_| Transition::Up(store_id))
    }

    /// The transport could not reach `store_id`. Returns `Down` if it was up and has been
    /// silent for a while (a connection that just broke while messages still arrive the other
    /// way is not a dead store).
    pub fn unreachable(&self, store_id: u64, now: Instant) -> Option<Transition> {
        let mut s = self.stores.lock();
        let e = s.entry(store_id).or_insert(Entry {
            last_heard: now,
            down_since: None,
        });
        if e.down_since.is_some() {
            return None;
        }
        if now.saturating_duration_since(e.last_heard) >= self.timeout / 2 {
            e.down_since = Some(now);
            return Some(Transition::Down(store_id));
        }
        None
    }

    /// Stores silent past the timeout turn down (called on every tick; a handful of stores).
    pub fn check(&self, now: Instant, out: &mut Vec<Transition>) {
        let mut s = self.stores.lock();
        for (id, e) in s.iter_mut() {
            if e.down_since.is_none() && now.saturating_duration_since(e.last_heard) >= self.timeout
            {
                e.down_since = Some(now);
                out.push(Transition::Down(*id));
            }
        }
    }

    /// Whether `store_id` is taken as down. A store never heard from is not (nothing is known).
    pub fn is_down(&self, store_id: u64) -> bool {
        self.stores
            .lock()
            .get(&store_id)
            .is_some_and(|e| e.down_since.is_some())
    }

    /// How long `store_id` has been silent, if it is down.
    pub fn down_for(&self, store_id: u64, now: Instant) -> Option<Duration> {
        let s = self.stores.lock();
        let e = s.get(&store_id)?;
        e.down_since?;
        Some(now.saturating_duration_since(e.last_heard))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_and_unreachability_turn_a_store_down_until_heard_again() {
        let t0 = Instant::now();
        let l = StoreLiveness::new(Duration::from_secs(3));
        assert!(!l.is_down(2), "unknown stores are not down");
        assert_eq!(l.heard(2, t0), None);
        assert_eq!(l.heard(3, t0), None);
        let mut out = vec![];
        l.check(t0 + Duration::from_secs(2), &mut out);
        assert!(out.is_empty());
        // A connection failure right after hearing from it is not enough.
        assert_eq!(l.unreachable(3, t0 + Duration::from_millis(100)), None);
        assert_eq!(
            l.unreachable(3, t0 + Duration::from_secs(2)),
            Some(Transition::Down(3))
        );
        assert_eq!(
            l.unreachable(3, t0 + Duration::from_secs(2)),
            None,
            "edge only"
        );
        l.heard(2, t0 + Duration::from_secs(2));
        l.check(t0 + Duration::from_secs(4), &mut out);
        assert!(out.is_empty(), "3 is already down, 2 was heard: {out:?}");
        l.check(t0 + Duration::from_secs(6), &mut out);
        assert_eq!(out, vec![Transition::Down(2)]);
        assert!(l.is_down(2) && l.is_down(3));
        assert_eq!(
            l.down_for(3, t0 + Duration::from_secs(10)),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            l.heard(3, t0 + Duration::from_secs(11)),
            Some(Transition::Up(3))
        );
        assert!(!l.is_down(3));
        assert_eq!(l.down_for(3, t0 + Duration::from_secs(12)), None);
    }
}
