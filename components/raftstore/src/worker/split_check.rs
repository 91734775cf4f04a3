//! The split checker (one thread): scans a region's data to measure it and pick split keys,
//! off the pollers, from an engine snapshot taken when the check was scheduled.

use crate::fsm::context::StoreContext;
use crate::msg::{CasualMessage, PeerMsg};
use crate::task::{SplitCheckMsg, SplitCheckTask};
use crate::util;
use atoll_engine::{EngineIterator, IterOptions, Iterable, KvEngine, DATA_CFS};
use crossbeam_channel::Receiver;
use std::sync::Arc;

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
        if keys_out.last().is_none_or(|p| p < k) && util::is_before_end(k, &region.end_key) {
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
    use atoll_engine::{WriteBatch, CF_DEFAULT};
    use atoll_proto::metapb;

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
