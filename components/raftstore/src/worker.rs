//! Background workers of a store, one thread each, fed by bounded queues:
//! - the region worker generates snapshot files and applies received ones, so neither stalls
//!   a poller;
//! - the split checker scans a region's data to measure it and pick split keys.

use crate::msg::{CasualMessage, PeerMsg};
use crate::snap::SnapKey;
use crate::storage::{self, GenSnapRequest};
use crate::store::StoreContext;
use crate::util;
use atoll_engine::{
    EngineIterator, IterOptions, Iterable, KvEngine, WriteBatch, CF_RAFT, DATA_CFS,
};
use atoll_proto::metapb;
use atoll_proto::raft_serverpb::{PeerState, RaftApplyState, SnapshotMeta};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use raft::eraftpb::{Snapshot, SnapshotMetadata};
use std::sync::Arc;
use std::time::Instant;

pub enum RegionTask<E: KvEngine> {
    GenSnapshot {
        region: metapb::Region,
        snap: E::Snapshot,
        index: u64,
        term: u64,
        request: GenSnapRequest,
    },
    ApplySnapshot {
        region: metapb::Region,
        meta: SnapshotMeta,
        apply_state: RaftApplyState,
        /// A retry after a failed apply: not before then (the worker holds it meanwhile).
        not_before: Option<Instant>,
    },
    Stop,
}

pub enum SplitCheckMsg<E: KvEngine> {
    Check(SplitCheckTask<E>),
    Stop,
}

pub struct SplitCheckTask<E: KvEngine> {
    pub region: metapb::Region,
    pub snap: E::Snapshot,
    pub split_size: u64,
    pub split_keys: u64,
    /// Split at the middle even below the thresholds (PD asked).
    pub force: bool,
}

pub fn run_region_worker<E: KvEngine>(ctx: Arc<StoreContext<E>>, rx: Receiver<RegionTask<E>>) {
    // Retries waiting for their time.
    let mut delayed: Vec<(Instant, RegionTask<E>)> = vec![];
    loop {
        let next_due = delayed.iter().map(|(t, _)| *t).min();
        let task = match next_due {
            Some(due) if due <= Instant::now() => {
                let i = delayed
                    .iter()
                    .position(|(t, _)| *t == due)
                    .expect("the earliest delayed task");
                delayed.swap_remove(i).1
            }
            Some(due) => match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
                Ok(t) => t,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            },
            None => match rx.recv() {
                Ok(t) => t,
                Err(_) => break,
            },
        };
        if let RegionTask::ApplySnapshot {
            not_before: Some(t),
            ..
        } = &task
        {
            if *t > Instant::now() {
                delayed.push((*t, task));
                continue;
            }
        }
        match task {
            RegionTask::GenSnapshot {
                region,
                snap,
                index,
                term,
                request,
            } => {
                let res = gen_snapshot(&ctx, &region, &snap, index, term);
                if let Err(e) = &res {
                    // The peer's storage asks again the next time raft wants to send it.
                    tracing::warn!(region_id = region.id, error = %e, "generate snapshot");
                    ctx.metrics.on_snapshot("generate_failed");
                } else {
                    ctx.metrics.on_snapshot("generated");
                }
                *request.slot.lock() = Some(res.map_err(|e| e.to_string()));
                let _ = ctx.router.force_send(region.id, PeerMsg::SnapshotGenerated);
            }
            RegionTask::ApplySnapshot {
                region,
                meta,
                apply_state,
                not_before,
            } => {
                // A retry is for a peer still waiting on this snapshot (not destroyed since).
                if not_before.is_some() {
                    match storage::load_region_state(&ctx.engine, region.id) {
                        Ok(Some(s)) if s.state == PeerState::Applying as i32 => {}
                        other => {
                            tracing::info!(region_id = region.id, state = ?other.map(|s| s.map(|s| s.state)), "snapshot no longer pending; retry dropped");
                            continue;
                        }
                    }
                }
                let ok = match apply_snapshot(&ctx, &region, &meta, &apply_state) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::error!(region_id = region.id, error = %e, "apply snapshot");
                        false
                    }
                };
                let _ = ctx
                    .router
                    .force_send(region.id, PeerMsg::SnapshotApplied { ok });
            }
            RegionTask::Stop => break,
        }
    }
}

fn gen_snapshot<E: KvEngine>(
    ctx: &StoreContext<E>,
    region: &metapb::Region,
    snap: &E::Snapshot,
    index: u64,
    term: u64,
) -> crate::Result<Snapshot> {
    fail::fail_point!(crate::failpoints::SNAP_GENERATE, |_| Err(
        crate::Error::Other("failpoint: snapshot generation".into())
    ));
    let key = SnapKey {
        region_id: region.id,
        term,
        index,
    };
    let (size, count) = ctx.snap_mgr.build(snap, region, &key)?;
    let meta = SnapshotMeta {
        region: Some(region.clone()),
        index,
        term,
        data_size: size,
        key_count: count,
        generation_id: 0,
    };
    let mut md = SnapshotMetadata {
        index,
        term,
        ..Default::default()
    };
    md.set_conf_state(util::conf_state_from_region(region));
    let mut s = Snapshot {
        data: prost::Message::encode_to_vec(&meta).into(),
        ..Default::default()
    };
    s.set_metadata(md);
    Ok(s)
}

fn apply_snapshot<E: KvEngine>(
    ctx: &StoreContext<E>,
    region: &metapb::Region,
    meta: &SnapshotMeta,
    apply_state: &RaftApplyState,
) -> crate::Result<()> {
    fail::fail_point!(crate::failpoints::SNAP_APPLY, |_| Err(crate::Error::Other(
        "failpoint: snapshot apply".into()
    )));
    let _g = ctx.snap_mgr.applying();
    let key = SnapKey::from_meta(meta);
    let path = ctx.snap_mgr.recv_path(&key);
    let count = ctx.snap_mgr.apply(
        &ctx.engine,
        region,
        &path,
        ctx.cfg.apply_batch_size.0 as usize,
    )?;
    let mut wb = ctx.engine.write_batch();
    wb.put_cf(
        CF_RAFT,
        &atoll_keys::apply_state_key(region.id),
        &util::encode_msg(apply_state),
    )?;
    storage::write_region_state(&mut wb, region, PeerState::Normal)?;
    ctx.engine.write(wb, true)?;
    let _ = std::fs::remove_file(&path);
    tracing::info!(
        region_id = region.id,
        index = meta.index,
        keys = count,
        "snapshot applied"
    );
    Ok(())
}

/// Re-applies snapshots that were being applied when the store stopped.
pub fn resume_snapshot_apply<E: KvEngine>(
    ctx: &StoreContext<E>,
    region: &metapb::Region,
) -> crate::Result<()> {
    let apply_state = storage::load_apply_state(&ctx.engine, region.id)?.unwrap_or_default();
    let meta = SnapshotMeta {
        region: Some(region.clone()),
        index: apply_state.truncated_state.as_ref().map_or(0, |t| t.index),
        term: apply_state.truncated_state.as_ref().map_or(0, |t| t.term),
        ..Default::default()
    };
    apply_snapshot(ctx, region, &meta, &apply_state)
}

pub fn run_split_checker<E: KvEngine>(ctx: Arc<StoreContext<E>>, rx: Receiver<SplitCheckMsg<E>>) {
    while let Ok(SplitCheckMsg::Check(task)) = rx.recv() {
        let region_id = task.region.id;
        let epoch = util::epoch(&task.region);
        let msg = match check_split(&task) {
            Ok((size, keys, split_keys)) => CasualMessage::SplitCheckResult {
                epoch,
                split_keys,
                size,
                keys,
            },
            Err(e) => {
                tracing::warn!(region_id, error = %e, "split check");
                CasualMessage::RegionStats { size: 0, keys: 0 }
            }
        };
        let _ = ctx.router.force_send(region_id, PeerMsg::Casual(msg));
    }
}

/// Measures the region and picks split keys: one per `split_size` bytes (or `split_keys` keys)
/// when the region is past a threshold, taken from the largest column family at user-key
/// boundaries.
pub fn check_split<S: Iterable>(
    task: &SplitCheckTask<impl KvEngine<Snapshot = S>>,
) -> crate::Result<(u64, u64, Vec<Vec<u8>>)> {
    let region = &task.region;
    let (start, end) = util::data_bounds(region);
    let mut total_size = 0u64;
    let mut total_keys = 0u64;
    // Per column family: (size, samples of (cumulative size, cumulative keys, user key)).
    type Samples = Vec<(u64, u64, Vec<u8>)>;
    let mut best: Option<(u64, Samples)> = None;
    let sample_every = (task.split_size / 16).max(1);
    for cf in DATA_CFS {
        let mut it = task.snap.iterator_cf(
            cf,
            IterOptions::new(Some(start.clone()), Some(end.clone())).no_cache(),
        )?;
        let mut ok = it.seek(&start)?;
        let (mut size, mut keys) = (0u64, 0u64);
        let mut samples = vec![];
        let mut last_sample = 0u64;
        let mut last_user: Vec<u8> = vec![];
        while ok {
            let k = it.key();
            size += (k.len() + it.value().len()) as u64;
            keys += 1;
            if size - last_sample >= sample_every {
                if let Ok(uk) = util::user_key_of(k) {
                    if uk != last_user && uk.as_slice() > region.start_key.as_slice() {
                        samples.push((size, keys, uk.clone()));
                        last_user = uk;
                        last_sample = size;
                    }
                }
            }
            ok = it.next()?;
        }
        total_size += size;
        total_keys += keys;
        if best.as_ref().is_none_or(|(s, _)| size > *s) {
            best = Some((size, samples));
        }
    }
    let over = total_size >= task.split_size || total_keys >= task.split_keys;
    if !(over || task.force) {
        return Ok((total_size, total_keys, vec![]));
    }
    let Some((cf_size, samples)) = best else {
        return Ok((total_size, total_keys, vec![]));
    };
    if samples.is_empty() || cf_size == 0 {
        return Ok((total_size, total_keys, vec![]));
    }
    // Parts of about split_size (or split_keys); at least halve the region.
    let parts_by_size = total_size / task.split_size.max(1);
    let parts_by_keys = total_keys / task.split_keys.max(1);
    let parts = parts_by_size.max(parts_by_keys).max(2);
    let mut keys_out: Vec<Vec<u8>> = vec![];
    let last_key = samples.last().map(|s| s.0).unwrap_or(0).max(1);
    for i in 1..parts {
        let target = cf_size * i / parts;
        let Some(pos) = samples.iter().position(|s| s.0 >= target) else {
            break;
        };
        let k = &samples[pos].2;
        if keys_out.last().is_none_or(|p| p < k)
            && (region.end_key.is_empty() || k.as_slice() < region.end_key.as_slice())
        {
            keys_out.push(k.clone());
        }
    }
    let _ = last_key;
    Ok((total_size, total_keys, keys_out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use atoll_engine::memory::MemoryEngine;
    use atoll_engine::CF_DEFAULT;

    #[test]
    fn picks_split_keys_at_user_key_boundaries() {
        let e = MemoryEngine::new();
        let mut wb = e.write_batch();
        for i in 0..1000u32 {
            let uk = format!("key{i:04}");
            for ts in [5u64, 9] {
                let k = atoll_keys::append_ts(atoll_keys::data_key(uk.as_bytes()), ts);
                wb.put_cf(CF_DEFAULT, &k, &[0u8; 100]).unwrap();
            }
        }
        e.write(wb, true).unwrap();
        let region = metapb::Region {
            id: 1,
            ..Default::default()
        };
        let task = SplitCheckTask::<MemoryEngine> {
            region: region.clone(),
            snap: e.snapshot(),
            split_size: 50_000,
            split_keys: 1 << 30,
            force: false,
        };
        let (size, keys, split) = check_split(&task).unwrap();
        assert_eq!(keys, 2000);
        assert!(size > 200_000);
        assert!(split.len() >= 3, "{split:?}");
        for w in split.windows(2) {
            assert!(w[0] < w[1]);
        }
        assert!(split.iter().all(|k| k.starts_with(b"key")));
        // Below the threshold: measured, not split.
        let task = SplitCheckTask::<MemoryEngine> {
            region,
            snap: e.snapshot(),
            split_size: 1 << 30,
            split_keys: 1 << 30,
            force: false,
        };
        let (_, _, split) = check_split(&task).unwrap();
        assert!(split.is_empty());
    }
}
