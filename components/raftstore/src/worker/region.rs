//! The region worker (one thread): generates snapshot files and applies received ones, so
//! that neither stalls a poller. A failed apply is retried after the back-off its peer asks for.

use crate::fsm::context::StoreContext;
use crate::msg::PeerMsg;
use crate::raft::storage;
use crate::snap::SnapKey;
use crate::task::RegionTask;
use crate::util;
use atoll_engine::KvEngine;
use atoll_proto::metapb;
use atoll_proto::raft_serverpb::{PeerState, RaftApplyState, SnapshotMeta};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use raft::eraftpb::{Snapshot, SnapshotMetadata};
use std::sync::Arc;
use std::time::Instant;

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
    storage::write_apply_state(&mut wb, region.id, apply_state)?;
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
