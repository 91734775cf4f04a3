//! GC: versions below PD's safe point are dropped in bounded batches, leader by leader.

use crate::storage::*;
use atoll_engine::KvEngine;
use atoll_proto::kvrpcpb::*;
use atoll_txn::MvccReader;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

impl<E: KvEngine> Storage<E> {
    // ---------------- background: GC ----------------

    /// GC of old versions below PD's safe point, region by region (leaders only), in bounded
    /// batches, every `gc_interval` or at once when [`Storage::gc_wait`] asks; runs until
    /// `stop`.
    pub async fn run_background(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut t = tokio::time::interval(self.cfg.gc_interval.0);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = t.tick() => {}
                _ = self.gc_kick.notified() => {}
                _ = stop.changed() => return,
            }
            let sp = match self.pd.get_gc_safe_point().await {
                Ok(sp) => sp,
                Err(_) => continue,
            };
            if sp <= self.safe_point.load(Ordering::Relaxed) {
                continue;
            }
            self.safe_point.store(sp, Ordering::Relaxed);
            GC_SAFE_POINT.set(sp as i64);
            let n = self.gc_once(sp, &mut stop).await;
            if *stop.borrow() {
                return;
            }
            self.gc_done.send_replace(sp);
            tracing::info!(safe_point = sp, removed = n, "GC pass done");
        }
    }

    /// Waits until a GC pass at or above `safe_point` has finished over the regions this
    /// store leads, starting one at once if needed (the safe point must be in PD already).
    pub async fn gc_wait(&self, req: GcWaitRequest) -> RespResult<GcWaitResponse> {
        let mut done = self.gc_done.subscribe();
        if *done.borrow() < req.safe_point {
            self.gc_kick.notify_one();
        }
        let limit = Duration::from_millis(req.timeout_ms.clamp(1, 600_000));
        let waited = tokio::time::timeout(limit, done.wait_for(|d| *d >= req.safe_point)).await;
        let last = *self.gc_done.borrow();
        let mut resp = GcWaitResponse {
            done_safe_point: last,
            ..Default::default()
        };
        if !matches!(waited, Ok(Ok(_))) {
            resp.error = format!(
                "GC up to safe point {} not finished within {limit:?} (last pass: {last})",
                req.safe_point
            );
        }
        Ok(resp)
    }

    /// One pass over the regions this store leads. Returns the versions removed.
    pub async fn gc_once(
        &self,
        safe_point: u64,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> u64 {
        let mut removed = 0u64;
        for (region, leader) in self.router.regions() {
            if !leader {
                continue;
            }
            let mut from = region.start_key.clone();
            loop {
                if *stop.borrow() {
                    return removed;
                }
                let ctx = Context {
                    region_id: region.id,
                    region_epoch: region.region_epoch,
                    peer: None,
                    ..Default::default()
                };
                let Ok(snap) = self.write_snapshot(&ctx) else {
                    break;
                };
                let reader = MvccReader::new(snap.snap.clone());
                let Ok((mods, resume)) = atoll_txn::gc_key_range(
                    &reader,
                    &from,
                    &snap.region.end_key,
                    safe_point,
                    self.cfg.gc_batch_keys,
                ) else {
                    break;
                };
                let n = mods.len() as u64;
                if n > 0 {
                    if self.propose(&ctx, &snap.region, mods, ()).await.is_err() {
                        break;
                    }
                    removed += n;
                    GC_DELETES.inc_by(n);
                }
                match resume {
                    Some(k) => from = k,
                    None => break,
                }
                // Leave room for foreground work between batches.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        removed
    }
}

atoll_util::metric!(
    /// Engine deletes issued by GC (old versions and their values) below the safe point.
    static GC_DELETES: atoll_util::metrics::IntCounter = int_counter(
        "atoll_gc_deletes_total",
        "Engine deletes issued by GC (old versions and their values)"
    )
);
atoll_util::metric!(
    /// The GC safe point this store last acted on (a TSO timestamp).
    static GC_SAFE_POINT: atoll_util::metrics::IntGauge = int_gauge(
        "atoll_gc_safe_point",
        "GC safe point this store last acted on (TSO timestamp)"
    )
);
