//! Garbage collection of old versions below a safe point.
//!
//! For each user key, versions are visited newest first:
//! - every version with `commit_ts > safe_point` is kept;
//! - `Lock` and `Rollback` records at or below the safe point are removed;
//! - the newest data record at or below the safe point decides: a `Put` is kept (a read at the
//!   safe point must still see it), a `Delete` is removed; every older version is removed
//!   (write records and their `CF_DEFAULT` values).
//!
//! Work is bounded by `max_keys` removals. A pass may stop in the middle of a key; removals are
//! ordered so that the next pass, started from the returned resume key, reaches the same
//! decision: a `Delete` marker is removed only in the pass that removes the last version below
//! it. Locks are not touched (the GC driver resolves locks below the safe point first).

use atoll_engine::{EngineIterator, IterOptions, Snapshot, CF_WRITE};
use atoll_keys::{append_ts, data_key, decode_data_key, split_ts};

use crate::errors::Result;
use crate::reader::MvccReader;
use crate::txn::MvccTxn;
use crate::types::{Modify, Write, WriteType};

/// How many `next()` calls to try before seeking past versions above the safe point.
const SEEK_BOUND: usize = 8;

/// Collects the removals that GC at `safe_point` implies for the user keys in `[start, end)`
/// (empty `end` = unbounded), stopping once `max_keys` versions are removed (0 = unlimited).
///
/// Returns the removals and, if the range was not finished, the user key to resume from.
pub fn gc_key_range<S: Snapshot>(
    reader: &MvccReader<S>,
    start: &[u8],
    end: &[u8],
    safe_point: u64,
    max_keys: usize,
) -> Result<(Vec<Modify>, Option<Vec<u8>>)> {
    let lower = data_key(start);
    let upper = Some(atoll_keys::data_end_bound(end));
    if upper.as_ref().is_some_and(|u| *u <= lower) {
        return Ok((Vec::new(), None));
    }
    let limit = if max_keys == 0 { usize::MAX } else { max_keys };
    let mut it = reader.snapshot().iterator_cf(
        CF_WRITE,
        IterOptions::new(Some(lower.clone()), upper).no_cache(),
    )?;
    let mut valid = it.seek(&lower)?;
    let mut txn = MvccTxn::new(0);
    let mut removed = 0usize;

    while valid {
        let encoded = split_ts(it.key())?.0.to_vec();
        let user_key = decode_data_key(&encoded)?.0;
        if removed >= limit {
            return Ok((txn.into_modifies(), Some(user_key)));
        }
        // Whether the newest data version at or below the safe point has been found.
        let mut decided = false;
        let mut delete_marker: Option<u64> = None;
        let mut steps = 0;
        while valid {
            let (k, commit_ts) = split_ts(it.key())?;
            if k != encoded.as_slice() {
                break;
            }
            if commit_ts > safe_point {
                steps += 1;
                valid = if steps <= SEEK_BOUND {
                    it.next()?
                } else {
                    it.seek(&append_ts(encoded.clone(), safe_point))?
                };
                continue;
            }
            let write = Write::decode(it.value())?;
            let remove = if decided {
                true
            } else {
                match write.write_type {
                    WriteType::Put => {
                        decided = true;
                        false
                    }
                    WriteType::Delete => {
                        decided = true;
                        delete_marker = Some(commit_ts);
                        false
                    }
                    WriteType::Lock | WriteType::Rollback => true,
                }
            };
            if remove {
                if removed >= limit {
                    // Stop mid-key; the delete marker (if any) stays for the next pass.
                    return Ok((txn.into_modifies(), Some(user_key)));
                }
                txn.delete_write(&user_key, commit_ts);
                if write.write_type == WriteType::Put && write.short_value.is_none() {
                    txn.delete_value(&user_key, write.start_ts);
                }
                removed += 1;
            }
            valid = it.next()?;
        }
        if let Some(commit_ts) = delete_marker {
            txn.delete_write(&user_key, commit_ts);
            removed += 1;
        }
    }
    Ok((txn.into_modifies(), None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use atoll_engine::memory::MemoryEngine;
    use atoll_engine::{Iterable, KvEngine, Peekable, CF_DEFAULT};

    fn versions(e: &MemoryEngine, key: &[u8]) -> Vec<(u64, WriteType)> {
        let mut out = Vec::new();
        let enc = data_key(key);
        e.scan_cf(CF_WRITE, &enc, None, true, |k, v| {
            let (ek, ts) = split_ts(k).unwrap();
            if ek != enc.as_slice() {
                return Ok(false);
            }
            out.push((ts, Write::decode(v).unwrap().write_type));
            Ok(true)
        })
        .unwrap();
        out
    }

    fn must_gc(e: &MemoryEngine, safe_point: u64, max_keys: usize) -> Option<Vec<u8>> {
        let r = MvccReader::new(e.snapshot());
        let (m, resume) = gc_key_range(&r, b"", b"", safe_point, max_keys).unwrap();
        must_apply(e, m);
        resume
    }

    fn fixture() -> MemoryEngine {
        let e = MemoryEngine::new();
        // a: put@10 (big), put@20, rollback@25, lock@30, put@40
        must_raw_put_big(&e, b"a", 9, 10, big(b'1'));
        must_raw_write(
            &e,
            b"a",
            20,
            Write::new(WriteType::Put, 19, Some(b"a20".to_vec())),
        );
        must_raw_write(&e, b"a", 25, Write::new_rollback(25, true));
        must_raw_write(&e, b"a", 30, Write::new(WriteType::Lock, 29, None));
        must_raw_write(
            &e,
            b"a",
            40,
            Write::new(WriteType::Put, 39, Some(b"a40".to_vec())),
        );
        // b: put@10, delete@20
        must_raw_write(
            &e,
            b"b",
            10,
            Write::new(WriteType::Put, 9, Some(b"b10".to_vec())),
        );
        must_raw_write(&e, b"b", 20, Write::new(WriteType::Delete, 19, None));
        // c: rollback@5 only
        must_raw_write(&e, b"c", 5, Write::new_rollback(5, false));
        e
    }

    #[test]
    fn keeps_the_right_versions() {
        let e = fixture();
        assert_eq!(must_gc(&e, 35, 0), None);
        // a: newest put at or below 35 is @20: keep it, drop rollback@25, lock@30, put@10
        // (and its big value); keep put@40.
        assert_eq!(
            versions(&e, b"a"),
            vec![(40, WriteType::Put), (20, WriteType::Put)]
        );
        assert!(e
            .get_value_cf(CF_DEFAULT, &crate::types::default_key(b"a", 9))
            .unwrap()
            .is_none());
        // b: deleted at 20 <= 35: everything goes.
        assert!(versions(&e, b"b").is_empty());
        assert!(versions(&e, b"c").is_empty());
        let r = MvccReader::new(e.snapshot());
        assert_eq!(r.get(b"a", 35, &[]).unwrap(), Some(b"a20".to_vec()));
        assert_eq!(r.get(b"a", u64::MAX, &[]).unwrap(), Some(b"a40".to_vec()));
        assert_eq!(r.get(b"b", 35, &[]).unwrap(), None);
    }

    #[test]
    fn low_safe_point_keeps_newer_data() {
        let e = fixture();
        assert_eq!(must_gc(&e, 15, 0), None);
        assert_eq!(
            versions(&e, b"a").len(),
            5,
            "nothing of a is below its newest put <= 15"
        );
        assert_eq!(
            versions(&e, b"b"),
            vec![(20, WriteType::Delete), (10, WriteType::Put)]
        );
        assert!(versions(&e, b"c").is_empty());
        let r = MvccReader::new(e.snapshot());
        assert_eq!(r.get(b"a", 15, &[]).unwrap(), Some(big(b'1')));
        // Idempotent.
        let (m, _) = gc_key_range(&r, b"", b"", 15, 0).unwrap();
        assert!(m.is_empty());
    }

    #[test]
    fn bounded_passes_reach_the_same_result() {
        // Many versions on one key, then a delete on top: the delete must survive until
        // every older version is gone, so no pass can resurrect an old value.
        let e = MemoryEngine::new();
        for i in 1..=20u64 {
            must_raw_write(
                &e,
                b"k",
                i * 10,
                Write::new(WriteType::Put, i * 10 - 1, Some(vec![i as u8])),
            );
        }
        must_raw_write(&e, b"k", 300, Write::new(WriteType::Delete, 299, None));
        must_raw_write(
            &e,
            b"k",
            400,
            Write::new(WriteType::Put, 399, Some(b"new".to_vec())),
        );
        for i in 0..5u8 {
            must_raw_write(
                &e,
                &[b'z', i],
                10,
                Write::new(WriteType::Put, 9, Some(vec![i])),
            );
            must_raw_write(&e, &[b'z', i], 20, Write::new(WriteType::Delete, 19, None));
        }
        let mut passes = 0;
        let mut start = Vec::new();
        loop {
            passes += 1;
            let r = MvccReader::new(e.snapshot());
            let (m, resume) = gc_key_range(&r, &start, b"", 350, 3).unwrap();
            let write_deletes = m.iter().filter(|m| m.cf() == CF_WRITE).count();
            assert!(write_deletes <= 4, "bounded: {write_deletes}");
            must_apply(&e, m);
            // Between passes, reads at the safe point never see a resurrected value.
            let r = MvccReader::new(e.snapshot());
            assert_eq!(r.get(b"k", 350, &[]).unwrap(), None);
            assert_eq!(r.get(b"k", u64::MAX, &[]).unwrap(), Some(b"new".to_vec()));
            match resume {
                Some(k) => start = k,
                None => break,
            }
            assert!(passes < 100);
        }
        assert!(passes >= 8, "{passes}");
        assert_eq!(versions(&e, b"k"), vec![(400, WriteType::Put)]);
        for i in 0..5u8 {
            assert!(versions(&e, &[b'z', i]).is_empty());
        }
    }

    #[test]
    fn respects_range_and_many_versions_above_safe_point() {
        let e = MemoryEngine::new();
        for i in 1..=30u64 {
            must_raw_write(
                &e,
                b"m",
                i * 10,
                Write::new(WriteType::Put, i * 10 - 1, Some(vec![i as u8])),
            );
            must_raw_write(
                &e,
                b"n",
                i * 10,
                Write::new(WriteType::Put, i * 10 - 1, Some(vec![i as u8])),
            );
        }
        let r = MvccReader::new(e.snapshot());
        // Only "m" (range [m, n)).
        let (m, resume) = gc_key_range(&r, b"m", b"n", 55, 0).unwrap();
        assert_eq!(resume, None);
        must_apply(&e, m);
        let vm = versions(&e, b"m");
        assert_eq!(vm.len(), 26, "versions 60..=300 plus 50");
        assert_eq!(vm.last().unwrap().0, 50);
        assert_eq!(versions(&e, b"n").len(), 30);
        let (m, _) = gc_key_range(&r, b"n", b"m", 55, 0).unwrap();
        assert!(m.is_empty());
    }

    /// Random histories: after GC at a safe point, in passes of random size, every read at or
    /// above the safe point returns what it returned before, and nothing at or below the safe
    /// point is left except each key's newest Put.
    #[test]
    fn random_histories_read_the_same_after_gc() {
        let user_keys: Vec<&[u8]> = vec![b"a", b"a\0", b"abcdefghi", b"b", b"c"];
        for seed in 1..=30u64 {
            let mut rng = Rng::new(seed);
            let e = MemoryEngine::new();
            let mut max_ts = 0;
            for k in &user_keys {
                let mut ts = 0;
                for _ in 0..rng.below(15) {
                    ts += 2 + rng.below(5);
                    match rng.below(5) {
                        0 => must_raw_write(
                            &e,
                            k,
                            ts,
                            Write::new(WriteType::Put, ts - 1, Some(vec![ts as u8])),
                        ),
                        1 => must_raw_put_big(&e, k, ts - 1, ts, vec![ts as u8; 300]),
                        2 => must_raw_write(&e, k, ts, Write::new(WriteType::Delete, ts - 1, None)),
                        3 => must_raw_write(&e, k, ts, Write::new(WriteType::Lock, ts - 1, None)),
                        _ => must_raw_write(&e, k, ts, Write::new_rollback(ts, rng.below(2) == 0)),
                    }
                }
                max_ts = max_ts.max(ts);
            }
            let safe_point = rng.below(max_ts + 2);
            let read_all = |e: &MemoryEngine| {
                let r = MvccReader::new(e.snapshot());
                (safe_point..=max_ts + 1)
                    .map(|ts| r.scan(b"", b"", 0, ts, false, false, &[]).unwrap())
                    .collect::<Vec<_>>()
            };
            let before = read_all(&e);
            let max_keys = 1 + rng.below(4) as usize;
            let mut start = Vec::new();
            let mut passes = 0;
            loop {
                passes += 1;
                assert!(passes < 1000, "seed {seed}: GC does not finish");
                let r = MvccReader::new(e.snapshot());
                let (m, resume) = gc_key_range(&r, &start, b"", safe_point, max_keys).unwrap();
                must_apply(&e, m);
                assert_eq!(
                    read_all(&e),
                    before,
                    "seed {seed} safe point {safe_point} pass {passes}"
                );
                match resume {
                    Some(k) => start = k,
                    None => break,
                }
            }
            for k in &user_keys {
                let at_or_below: Vec<_> = versions(&e, k)
                    .into_iter()
                    .filter(|(ts, _)| *ts <= safe_point)
                    .collect();
                assert!(
                    at_or_below.is_empty()
                        || at_or_below == vec![(at_or_below[0].0, WriteType::Put)],
                    "seed {seed} key {k:?}: {at_or_below:?}"
                );
            }
            // Every CF_DEFAULT value left is referenced by a Put record.
            e.scan_cf(CF_DEFAULT, b"", None, true, |k, _| {
                let (enc, start_ts) = split_ts(k).unwrap();
                let user_key = decode_data_key(enc).unwrap().0;
                let r = MvccReader::new(e.snapshot());
                let mut found = false;
                let mut ts = u64::MAX;
                while let Some((c, w)) = r.seek_write(&user_key, ts).unwrap() {
                    found |= w.write_type == WriteType::Put && w.start_ts == start_ts;
                    if c == 0 {
                        break;
                    }
                    ts = c - 1;
                }
                assert!(
                    found,
                    "seed {seed}: orphaned value of {user_key:?}@{start_ts}"
                );
                Ok(true)
            })
            .unwrap();
        }
    }
}
