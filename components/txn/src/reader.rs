//! [`MvccReader`]: multi-version reads over one engine snapshot.
//!
//! Layout reminder (see `types.rs`): `CF_WRITE` keys are `data_key(k) ++ !commit_ts`, so the
//! versions of a key are contiguous and newest first, and `data_key` preserves user-key order.
//! A read at `ts` sees the newest `Put`/`Delete` with `commit_ts <= ts` (`Lock` and `Rollback`
//! records carry no data and are skipped), after checking that no lock blocks it.
//!
//! Lock rule for a read at `ts` (shared by [`MvccReader::get`] and [`MvccReader::scan`]): a lock
//! blocks iff it is a `Put`/`Delete` lock, `lock.start_ts <= ts`, its transaction is not in
//! `bypass_locks`, and (unless `ts == u64::MAX`) `lock.min_commit_ts <= ts`. `Lock` and
//! `Pessimistic` locks never block reads.

use atoll_engine::{EngineIterator, IterOptions, Snapshot, CF_DEFAULT, CF_LOCK, CF_WRITE};
use atoll_keys::{append_ts, data_key, decode_data_key, split_ts};

use crate::errors::{Error, Result};
use crate::types::{default_key, lock_key, write_key, KeyMeta, Lock, LockType, Write, WriteType};

/// How many `next()` calls to try before falling back to a `seek()` when skipping versions.
const SEEK_BOUND: usize = 8;

/// The outcome of looking for a transaction's commit record on a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnCommitRecord {
    /// A record of the transaction: a `Put`/`Delete`/`Lock` means committed at `commit_ts`,
    /// a `Rollback` means rolled back.
    SingleRecord {
        /// Where the record is.
        commit_ts: u64,
        /// The record.
        write: Write,
    },
    /// Another transaction's write at `commit_ts == start_ts` carries this transaction's
    /// rollback (the `has_overlapped_rollback` flag): rolled back.
    OverlappedRollback {
        /// Where the record is (equals the transaction's `start_ts`).
        commit_ts: u64,
    },
    /// No record. `overlapped_write` is another transaction's write sitting exactly at
    /// `commit_ts == start_ts`, where a rollback record would go.
    None {
        /// The write occupying the rollback record's key, if any.
        overlapped_write: Option<Write>,
    },
}

impl TxnCommitRecord {
    /// The commit timestamp if the record says committed.
    pub fn committed_ts(&self) -> Option<u64> {
        match self {
            TxnCommitRecord::SingleRecord { commit_ts, write }
                if write.write_type != WriteType::Rollback =>
            {
                Some(*commit_ts)
            }
            _ => None,
        }
    }

    /// Whether the record says rolled back.
    pub fn is_rolled_back(&self) -> bool {
        match self {
            TxnCommitRecord::SingleRecord { write, .. } => write.write_type == WriteType::Rollback,
            TxnCommitRecord::OverlappedRollback { .. } => true,
            TxnCommitRecord::None { .. } => false,
        }
    }
}

/// Whether `lock` blocks a read at `ts` (the rule in the module doc).
pub fn lock_blocks_read(lock: &Lock, ts: u64, bypass_locks: &[u64]) -> bool {
    if !matches!(lock.lock_type, LockType::Put | LockType::Delete) {
        return false;
    }
    if lock.start_ts > ts || bypass_locks.contains(&lock.start_ts) {
        return false;
    }
    if ts != u64::MAX && lock.min_commit_ts > ts {
        return false;
    }
    true
}

/// The smallest engine key greater than every `CF_WRITE`/`CF_DEFAULT` version of `encoded`.
fn past_versions(encoded: &[u8]) -> Vec<u8> {
    let mut k = append_ts(encoded.to_vec(), 0);
    k.push(0);
    k
}

fn user_key_of(encoded: &[u8]) -> Result<Vec<u8>> {
    Ok(decode_data_key(encoded)?.0)
}

/// The user key and commit timestamp of a key of the write column family.
pub fn decode_write_key(raw: &[u8]) -> Result<(Vec<u8>, u64)> {
    let (encoded, commit_ts) = split_ts(raw)?;
    Ok((user_key_of(encoded)?, commit_ts))
}

/// A live key at a timestamp: user key, value, and its version's metadata.
pub type KeyVersion = (Vec<u8>, Vec<u8>, KeyMeta);

/// Reads MVCC data from one snapshot. Every method is a pure read; nothing is cached.
#[derive(Clone)]
pub struct MvccReader<S: Snapshot> {
    snapshot: S,
}

impl<S: Snapshot> MvccReader<S> {
    /// A reader over `snapshot`.
    pub fn new(snapshot: S) -> Self {
        MvccReader { snapshot }
    }

    /// The underlying snapshot.
    pub fn snapshot(&self) -> &S {
        &self.snapshot
    }

    /// The lock on `user_key`, if any.
    pub fn load_lock(&self, user_key: &[u8]) -> Result<Option<Lock>> {
        match self.snapshot.get_value_cf(CF_LOCK, &lock_key(user_key))? {
            Some(v) => Ok(Some(Lock::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// An iterator over the write records of one key with `commit_ts <= max_ts`, positioned at
    /// the newest of them.
    fn key_versions(&self, encoded: &[u8], max_ts: u64) -> Result<(S::Iterator, bool)> {
        let lower = append_ts(encoded.to_vec(), max_ts);
        let opts = IterOptions::new(Some(lower.clone()), Some(past_versions(encoded)));
        let mut it = self.snapshot.iterator_cf(CF_WRITE, opts)?;
        let valid = it.seek(&lower)?;
        Ok((it, valid))
    }

    /// The newest write record of `user_key` with `commit_ts <= ts`, of any type.
    pub fn seek_write(&self, user_key: &[u8], ts: u64) -> Result<Option<(u64, Write)>> {
        let (it, valid) = self.key_versions(&data_key(user_key), ts)?;
        if !valid {
            return Ok(None);
        }
        let (_, commit_ts) = split_ts(it.key())?;
        Ok(Some((commit_ts, Write::decode(it.value())?)))
    }

    /// The commit timestamp of the newest write record of `user_key` (any type, rollbacks
    /// included).
    pub fn latest_commit_ts(&self, user_key: &[u8]) -> Result<Option<u64>> {
        Ok(self.seek_write(user_key, u64::MAX)?.map(|(ts, _)| ts))
    }

    /// The newest data record (`Put`) of `user_key` visible at `ts`, skipping `Lock` and
    /// `Rollback` records; `None` if the newest data record is a `Delete` or there is none.
    /// Locks are not checked.
    pub fn get_write(&self, user_key: &[u8], ts: u64) -> Result<Option<(u64, Write)>> {
        let (mut it, mut valid) = self.key_versions(&data_key(user_key), ts)?;
        while valid {
            let write = Write::decode(it.value())?;
            match write.write_type {
                WriteType::Put => return Ok(Some((split_ts(it.key())?.1, write))),
                WriteType::Delete => return Ok(None),
                WriteType::Lock | WriteType::Rollback => valid = it.next()?,
            }
        }
        Ok(None)
    }

    /// The newest data record (`Put` or `Delete`) of `user_key` with `commit_ts <= ts`,
    /// skipping `Lock` and `Rollback` records: the predecessor a new write's key metadata
    /// (etcd's create revision and version) continues from.
    pub fn latest_data_write(&self, user_key: &[u8], ts: u64) -> Result<Option<(u64, Write)>> {
        let (mut it, mut valid) = self.key_versions(&data_key(user_key), ts)?;
        while valid {
            let write = Write::decode(it.value())?;
            if write.is_data_change() {
                return Ok(Some((split_ts(it.key())?.1, write)));
            }
            valid = it.next()?;
        }
        Ok(None)
    }

    /// Looks for the record of transaction `start_ts` on `user_key`, scanning the write records
    /// newest first from `u64::MAX` down to `commit_ts == start_ts` (a transaction with a smaller
    /// start_ts may commit after one with a larger start_ts, so the newest record is not enough).
    pub fn get_txn_commit_record(&self, user_key: &[u8], start_ts: u64) -> Result<TxnCommitRecord> {
        let encoded = data_key(user_key);
        let lower = append_ts(encoded.clone(), u64::MAX);
        let mut upper = append_ts(encoded, start_ts);
        upper.push(0);
        let mut it = self
            .snapshot
            .iterator_cf(CF_WRITE, IterOptions::new(Some(lower.clone()), Some(upper)))?;
        let mut valid = it.seek(&lower)?;
        while valid {
            let (_, commit_ts) = split_ts(it.key())?;
            if commit_ts < start_ts {
                break;
            }
            let write = Write::decode(it.value())?;
            if write.start_ts == start_ts {
                return Ok(TxnCommitRecord::SingleRecord { commit_ts, write });
            }
            if commit_ts == start_ts {
                if write.has_overlapped_rollback {
                    return Ok(TxnCommitRecord::OverlappedRollback { commit_ts });
                }
                return Ok(TxnCommitRecord::None {
                    overlapped_write: Some(write),
                });
            }
            valid = it.next()?;
        }
        Ok(TxnCommitRecord::None {
            overlapped_write: None,
        })
    }

    /// The value a `Put` record stands for: its short value, or the value in `CF_DEFAULT`.
    pub fn load_data(&self, user_key: &[u8], write: &Write) -> Result<Vec<u8>> {
        if let Some(v) = &write.short_value {
            return Ok(v.clone());
        }
        if write.write_type != WriteType::Put {
            return Err(Error::Other(format!(
                "load_data on a {:?} record of key {user_key:?}",
                write.write_type
            )));
        }
        self.snapshot
            .get_value_cf(CF_DEFAULT, &default_key(user_key, write.start_ts))?
            .ok_or_else(|| Error::DefaultNotFound {
                key: user_key.to_vec(),
                start_ts: write.start_ts,
            })
    }

    /// Snapshot read of `user_key` at `ts` (`u64::MAX` = latest). A blocking lock (module doc)
    /// is [`Error::KeyIsLocked`].
    pub fn get(&self, user_key: &[u8], ts: u64, bypass_locks: &[u64]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .get_with_meta(user_key, ts, bypass_locks, false)?
            .map(|(v, _)| v))
    }

    /// [`MvccReader::get`] with the version's key metadata (and no value when `key_only`).
    pub fn get_with_meta(
        &self,
        user_key: &[u8],
        ts: u64,
        bypass_locks: &[u64],
        key_only: bool,
    ) -> Result<Option<(Vec<u8>, KeyMeta)>> {
        if let Some(lock) = self.load_lock(user_key)? {
            if lock_blocks_read(&lock, ts, bypass_locks) {
                return Err(Error::KeyIsLocked(lock.into_lock_info(user_key.to_vec())));
            }
        }
        match self.get_write(user_key, ts)? {
            Some((commit_ts, write)) => {
                let value = if key_only {
                    Vec::new()
                } else {
                    self.load_data(user_key, &write)?
                };
                Ok(Some((value, write.meta(commit_ts))))
            }
            None => Ok(None),
        }
    }

    /// Snapshot scan of the user keys in `[start, end)` (empty `end` = unbounded) at `ts`:
    /// `(user_key, value)` pairs of live keys in ascending order (descending when `reverse`),
    /// at most `limit` of them (0 = unlimited), with empty values when `key_only`.
    ///
    /// Locks are checked on the keys the scan passes (up to where `limit` stops it), with the
    /// same rule as [`MvccReader::get`]; the first blocking one is [`Error::KeyIsLocked`].
    /// The write and lock column families are walked side by side; a key's older versions are
    /// skipped by a few `next()`s and then a `seek()`.
    #[allow(clippy::too_many_arguments)]
    pub fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        ts: u64,
        key_only: bool,
        reverse: bool,
        bypass_locks: &[u64],
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .scan_with_meta(start, end, limit, ts, key_only, reverse, bypass_locks)?
            .into_iter()
            .map(|(k, v, _)| (k, v))
            .collect())
    }

    /// [`MvccReader::scan`] with each version's key metadata.
    #[allow(clippy::too_many_arguments)]
    pub fn scan_with_meta(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        ts: u64,
        key_only: bool,
        reverse: bool,
        bypass_locks: &[u64],
    ) -> Result<Vec<KeyVersion>> {
        let limit = if limit == 0 { usize::MAX } else { limit };
        let mut out = Vec::new();
        self.walk(
            start,
            end,
            ts,
            reverse,
            bypass_locks,
            &mut |user_key, write, commit_ts| {
                let value = if key_only {
                    Vec::new()
                } else {
                    self.load_data(&user_key, &write)?
                };
                out.push((user_key, value, write.meta(commit_ts)));
                Ok(out.len() < limit)
            },
        )?;
        Ok(out)
    }

    /// How many live keys `[start, end)` holds at `ts` (locks checked as by a scan).
    pub fn count(&self, start: &[u8], end: &[u8], ts: u64, bypass_locks: &[u64]) -> Result<u64> {
        let mut n = 0u64;
        self.walk(start, end, ts, false, bypass_locks, &mut |_, _, _| {
            n += 1;
            Ok(true)
        })?;
        Ok(n)
    }

    /// Visits the live keys of `[start, end)` at `ts` in order (reverse order with `reverse`):
    /// `visit(user_key, visible Put record, its commit_ts)` until it returns `false`.
    fn walk(
        &self,
        start: &[u8],
        end: &[u8],
        ts: u64,
        reverse: bool,
        bypass_locks: &[u64],
        visit: &mut Visit<'_>,
    ) -> Result<()> {
        let lower = data_key(start);
        let upper = atoll_keys::data_end_bound(end);
        if upper <= lower {
            return Ok(());
        }
        let opts = IterOptions::new(Some(lower.clone()), Some(upper));
        let mut scanner: Scanner<S> = Scanner {
            writes: self.snapshot.iterator_cf(CF_WRITE, opts.clone())?,
            locks: self.snapshot.iterator_cf(CF_LOCK, opts)?,
            ts,
            bypass_locks,
        };
        if reverse {
            scanner.backward(visit)
        } else {
            scanner.forward(&lower, visit)
        }
    }

    /// Every data change (`Put` or `Delete` record) in `[start, end)` (empty `end` =
    /// unbounded) committed in `(from_ts, to_ts]`, as `(user_key, commit_ts, record)` in key
    /// order, newest first per key: the history a change feed replays. Reads every version
    /// of the range (a change feed's catch-up, not a hot path); locks are not checked.
    pub fn scan_changes(
        &self,
        start: &[u8],
        end: &[u8],
        from_ts: u64,
        to_ts: u64,
    ) -> Result<Vec<(Vec<u8>, u64, Write)>> {
        let lower = data_key(start);
        let upper = atoll_keys::data_end_bound(end);
        if upper <= lower || to_ts <= from_ts {
            return Ok(Vec::new());
        }
        let mut it = self
            .snapshot
            .iterator_cf(CF_WRITE, IterOptions::new(Some(lower.clone()), Some(upper)))?;
        let mut valid = it.seek(&lower)?;
        let mut out = Vec::new();
        while valid {
            let (encoded, commit_ts) = split_ts(it.key())?;
            if commit_ts > from_ts && commit_ts <= to_ts {
                let write = Write::decode(it.value())?;
                if write.is_data_change() {
                    out.push((user_key_of(encoded)?, commit_ts, write));
                }
            }
            valid = it.next()?;
        }
        Ok(out)
    }

    /// The newest committed value of every live key in `[start, end)` (empty `end` =
    /// unbounded), locks not checked: what the region's applied data says now, for an owner
    /// that follows later changes itself (the lease timers). Reads every version of the range.
    pub fn scan_latest_committed(
        &self,
        start: &[u8],
        end: &[u8],
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let lower = data_key(start);
        let upper = atoll_keys::data_end_bound(end);
        if upper <= lower {
            return Ok(Vec::new());
        }
        let mut it = self
            .snapshot
            .iterator_cf(CF_WRITE, IterOptions::new(Some(lower.clone()), Some(upper)))?;
        let mut valid = it.seek(&lower)?;
        let mut out = Vec::new();
        // The encoded key whose newest data record was already taken (or found deleted).
        let mut decided: Option<Vec<u8>> = None;
        while valid {
            let (encoded, _) = split_ts(it.key())?;
            if decided.as_deref() != Some(encoded) {
                let write = Write::decode(it.value())?;
                if write.is_data_change() {
                    decided = Some(encoded.to_vec());
                    if write.write_type == WriteType::Put {
                        let key = user_key_of(encoded)?;
                        let value = self.load_data(&key, &write)?;
                        out.push((key, value));
                    }
                }
            }
            valid = it.next()?;
        }
        Ok(out)
    }

    /// The data record (`Put` or `Delete`) of `user_key` committed exactly at `commit_ts`.
    pub fn data_write_at(&self, user_key: &[u8], commit_ts: u64) -> Result<Option<Write>> {
        Ok(self
            .snapshot
            .get_value_cf(CF_WRITE, &write_key(user_key, commit_ts))?
            .map(|v| Write::decode(&v))
            .transpose()?
            .filter(Write::is_data_change))
    }

    /// Locks in `[start, end)` (empty `end` = unbounded) with `start_ts <= max_ts`, in key order,
    /// at most `limit` (0 = unlimited), as `(user_key, lock)`.
    pub fn scan_locks(
        &self,
        start: &[u8],
        end: &[u8],
        max_ts: u64,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Lock)>> {
        let lower = data_key(start);
        let upper = Some(atoll_keys::data_end_bound(end));
        if upper.as_ref().is_some_and(|u| *u <= lower) {
            return Ok(Vec::new());
        }
        let limit = if limit == 0 { usize::MAX } else { limit };
        let mut it = self
            .snapshot
            .iterator_cf(CF_LOCK, IterOptions::new(Some(lower.clone()), upper))?;
        let mut valid = it.seek(&lower)?;
        let mut out = Vec::new();
        while valid && out.len() < limit {
            let lock = Lock::decode(it.value())?;
            if lock.start_ts <= max_ts {
                out.push((user_key_of(it.key())?, lock));
            }
            valid = it.next()?;
        }
        Ok(out)
    }
}

/// What a scan does with each live key: `(user_key, visible Put, commit_ts)`; `false` stops.
type Visit<'v> = dyn FnMut(Vec<u8>, Write, u64) -> Result<bool> + 'v;

/// The state of one [`MvccReader::walk`].
struct Scanner<'a, S: Snapshot> {
    writes: S::Iterator,
    locks: S::Iterator,
    ts: u64,
    bypass_locks: &'a [u64],
}

impl<S: Snapshot> Scanner<'_, S> {
    /// The encoded user key under the write cursor.
    fn write_user(&self, valid: bool) -> Result<Option<Vec<u8>>> {
        if !valid {
            return Ok(None);
        }
        Ok(Some(split_ts(self.writes.key())?.0.to_vec()))
    }

    fn check_lock(&self, encoded: &[u8]) -> Result<()> {
        let lock = Lock::decode(self.locks.value())?;
        if lock_blocks_read(&lock, self.ts, self.bypass_locks) {
            return Err(Error::KeyIsLocked(
                lock.into_lock_info(user_key_of(encoded)?),
            ));
        }
        Ok(())
    }

    /// With the write cursor on some version of `encoded`, finds the version visible at `ts`
    /// (a `Put` and its commit_ts, or `None`), moving forward only within `encoded`'s versions.
    fn visible_forward(&mut self, encoded: &[u8], mut valid: bool) -> Result<Option<(Write, u64)>> {
        let mut steps = 0;
        let mut seeked = false;
        while valid {
            let (k, commit_ts) = split_ts(self.writes.key())?;
            if k != encoded {
                return Ok(None);
            }
            if commit_ts > self.ts {
                if steps < SEEK_BOUND || seeked {
                    steps += 1;
                    valid = self.writes.next()?;
                } else {
                    seeked = true;
                    valid = self.writes.seek(&append_ts(encoded.to_vec(), self.ts))?;
                }
                continue;
            }
            let write = Write::decode(self.writes.value())?;
            match write.write_type {
                WriteType::Put => return Ok(Some((write, commit_ts))),
                WriteType::Delete => return Ok(None),
                WriteType::Lock | WriteType::Rollback => valid = self.writes.next()?,
            }
        }
        Ok(None)
    }

    /// Moves the write cursor to the first version of the next user key after `encoded`.
    fn skip_forward_past(&mut self, encoded: &[u8]) -> Result<bool> {
        for _ in 0..SEEK_BOUND {
            if !self.writes.valid()? {
                return Ok(false);
            }
            if split_ts(self.writes.key())?.0 != encoded {
                return Ok(true);
            }
            self.writes.next()?;
        }
        if !self.writes.valid()? {
            return Ok(false);
        }
        if split_ts(self.writes.key())?.0 != encoded {
            return Ok(true);
        }
        Ok(self.writes.seek(&past_versions(encoded))?)
    }

    /// Hands a visible version to `visit`; whether to go on.
    fn emit(encoded: &[u8], found: Option<(Write, u64)>, visit: &mut Visit<'_>) -> Result<bool> {
        match found {
            Some((write, commit_ts)) => visit(user_key_of(encoded)?, write, commit_ts),
            None => Ok(true),
        }
    }

    fn forward(&mut self, lower: &[u8], visit: &mut Visit<'_>) -> Result<()> {
        let mut w_valid = self.writes.seek(lower)?;
        let mut l_valid = self.locks.seek(lower)?;
        loop {
            let w_key = self.write_user(w_valid)?;
            let l_key = if l_valid {
                Some(self.locks.key().to_vec())
            } else {
                None
            };
            let cur = match (&w_key, &l_key) {
                (None, None) => break,
                (Some(w), None) => w.clone(),
                (None, Some(l)) => l.clone(),
                (Some(w), Some(l)) => w.min(l).clone(),
            };
            if l_key.as_ref() == Some(&cur) {
                self.check_lock(&cur)?;
                l_valid = self.locks.next()?;
            }
            if w_key.as_ref() == Some(&cur) {
                let found = self.visible_forward(&cur, w_valid)?;
                w_valid = self.skip_forward_past(&cur)?;
                if !Self::emit(&cur, found, visit)? {
                    break;
                }
            }
        }
        Ok(())
    }

    fn backward(&mut self, visit: &mut Visit<'_>) -> Result<()> {
        let mut w_valid = self.writes.seek_to_last()?;
        let mut l_valid = self.locks.seek_to_last()?;
        loop {
            let w_key = self.write_user(w_valid)?;
            let l_key = if l_valid {
                Some(self.locks.key().to_vec())
            } else {
                None
            };
            let cur = match (&w_key, &l_key) {
                (None, None) => break,
                (Some(w), None) => w.clone(),
                (None, Some(l)) => l.clone(),
                (Some(w), Some(l)) => w.max(l).clone(),
            };
            if l_key.as_ref() == Some(&cur) {
                self.check_lock(&cur)?;
                l_valid = self.locks.prev()?;
            }
            if w_key.as_ref() == Some(&cur) {
                // The cursor is on the oldest version; jump to the newest visible one, read it,
                // then jump before the key's first version (`cur` itself sorts before all of
                // them and after every smaller key's versions).
                let valid = self.writes.seek(&append_ts(cur.clone(), self.ts))?;
                let found = self.visible_forward(&cur, valid)?;
                w_valid = self.writes.seek_for_prev(&cur)?;
                if !Self::emit(&cur, found, visit)? {
                    break;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use crate::types::Write;
    use atoll_engine::memory::MemoryEngine;

    fn reader(engine: &MemoryEngine) -> MvccReader<atoll_engine::memory::MemorySnapshot> {
        use atoll_engine::KvEngine;
        MvccReader::new(engine.snapshot())
    }

    /// k1: put v1@10 (start 5), delete@20 (start 15), put v3@30 (start 25)
    /// k2: put big@12 (start 11), lock@22, rollback@24
    /// k3: delete@8
    /// k4: put v4@40 (start 35)
    fn fixture() -> MemoryEngine {
        let e = MemoryEngine::new();
        must_raw_write(
            &e,
            b"k1",
            10,
            Write::new(WriteType::Put, 5, Some(b"v1".to_vec())),
        );
        must_raw_write(&e, b"k1", 20, Write::new(WriteType::Delete, 15, None));
        must_raw_write(
            &e,
            b"k1",
            30,
            Write::new(WriteType::Put, 25, Some(b"v3".to_vec())),
        );
        must_raw_put_big(&e, b"k2", 11, 12, big(b'x'));
        must_raw_write(&e, b"k2", 22, Write::new(WriteType::Lock, 21, None));
        must_raw_write(&e, b"k2", 24, Write::new_rollback(24, false));
        must_raw_write(&e, b"k3", 8, Write::new(WriteType::Delete, 7, None));
        must_raw_write(
            &e,
            b"k4",
            40,
            Write::new(WriteType::Put, 35, Some(b"v4".to_vec())),
        );
        e
    }

    #[test]
    fn get_at_timestamps() {
        let e = fixture();
        let r = reader(&e);
        assert_eq!(r.get(b"k1", 9, &[]).unwrap(), None);
        assert_eq!(r.get(b"k1", 10, &[]).unwrap(), Some(b"v1".to_vec()));
        assert_eq!(r.get(b"k1", 19, &[]).unwrap(), Some(b"v1".to_vec()));
        assert_eq!(r.get(b"k1", 20, &[]).unwrap(), None);
        assert_eq!(r.get(b"k1", 29, &[]).unwrap(), None);
        assert_eq!(r.get(b"k1", 30, &[]).unwrap(), Some(b"v3".to_vec()));
        assert_eq!(r.get(b"k1", u64::MAX, &[]).unwrap(), Some(b"v3".to_vec()));
        // Lock and rollback records are skipped; the big value comes from CF_DEFAULT.
        assert_eq!(r.get(b"k2", 11, &[]).unwrap(), None);
        assert_eq!(r.get(b"k2", 12, &[]).unwrap(), Some(big(b'x')));
        assert_eq!(r.get(b"k2", 100, &[]).unwrap(), Some(big(b'x')));
        assert_eq!(r.get(b"k3", 100, &[]).unwrap(), None);
        assert_eq!(r.get(b"nope", 100, &[]).unwrap(), None);
    }

    #[test]
    fn write_lookups() {
        let e = fixture();
        let r = reader(&e);
        assert_eq!(r.seek_write(b"k1", 25).unwrap().unwrap().0, 20);
        assert_eq!(r.seek_write(b"k1", 5).unwrap(), None);
        assert_eq!(r.latest_commit_ts(b"k2").unwrap(), Some(24));
        assert_eq!(r.latest_commit_ts(b"zz").unwrap(), None);
        assert_eq!(r.get_write(b"k2", 30).unwrap().unwrap().0, 12);
        assert_eq!(r.get_write(b"k1", 25).unwrap(), None);

        // Commit records.
        let rec = r.get_txn_commit_record(b"k1", 15).unwrap();
        assert_eq!(rec.committed_ts(), Some(20));
        let rec = r.get_txn_commit_record(b"k2", 24).unwrap();
        assert!(rec.is_rolled_back());
        assert_eq!(
            r.get_txn_commit_record(b"k1", 26).unwrap(),
            TxnCommitRecord::None {
                overlapped_write: None
            }
        );
        // Start ts 20 equals k1's delete commit ts: an overlapped write, no record.
        assert_eq!(
            r.get_txn_commit_record(b"k1", 20).unwrap(),
            TxnCommitRecord::None {
                overlapped_write: Some(Write::new(WriteType::Delete, 15, None))
            }
        );
        let mut overlapped = Write::new(WriteType::Put, 35, Some(b"v4".to_vec()));
        overlapped.has_overlapped_rollback = true;
        must_raw_write(&e, b"k4", 40, overlapped);
        let r = reader(&e);
        assert_eq!(
            r.get_txn_commit_record(b"k4", 40).unwrap(),
            TxnCommitRecord::OverlappedRollback { commit_ts: 40 }
        );
        assert!(r.get_txn_commit_record(b"k4", 40).unwrap().is_rolled_back());
        // Missing big value is a typed error.
        let missing = Write::new(WriteType::Put, 99, None);
        assert!(matches!(
            r.load_data(b"k9", &missing),
            Err(Error::DefaultNotFound { start_ts: 99, .. })
        ));
    }

    #[test]
    fn scan_forward_reverse_limit_key_only() {
        let e = fixture();
        let r = reader(&e);
        let all = r.scan(b"", b"", 0, u64::MAX, false, false, &[]).unwrap();
        assert_eq!(
            all,
            vec![
                (b"k1".to_vec(), b"v3".to_vec()),
                (b"k2".to_vec(), big(b'x')),
                (b"k4".to_vec(), b"v4".to_vec()),
            ]
        );
        let at_15 = r.scan(b"", b"", 0, 15, false, false, &[]).unwrap();
        assert_eq!(
            at_15,
            vec![
                (b"k1".to_vec(), b"v1".to_vec()),
                (b"k2".to_vec(), big(b'x'))
            ]
        );
        let at_25 = r.scan(b"k1", b"k9", 0, 25, false, false, &[]).unwrap();
        assert_eq!(keys(&at_25), vec![b"k2".to_vec()]);

        let rev = r.scan(b"", b"", 0, u64::MAX, false, true, &[]).unwrap();
        let mut expected = all.clone();
        expected.reverse();
        assert_eq!(rev, expected);
        let rev_15 = r.scan(b"", b"", 0, 15, false, true, &[]).unwrap();
        assert_eq!(keys(&rev_15), vec![b"k2".to_vec(), b"k1".to_vec()]);

        // Bounds: start inclusive, end exclusive.
        let mid = r
            .scan(b"k2", b"k4", 0, u64::MAX, false, false, &[])
            .unwrap();
        assert_eq!(keys(&mid), vec![b"k2".to_vec()]);
        let mid_rev = r.scan(b"k2", b"k4", 0, u64::MAX, false, true, &[]).unwrap();
        assert_eq!(keys(&mid_rev), vec![b"k2".to_vec()]);
        let from_k2 = r.scan(b"k2", b"", 0, u64::MAX, false, false, &[]).unwrap();
        assert_eq!(keys(&from_k2), vec![b"k2".to_vec(), b"k4".to_vec()]);
        assert!(r
            .scan(b"k4", b"k2", 0, u64::MAX, false, false, &[])
            .unwrap()
            .is_empty());
        assert!(r
            .scan(b"k2", b"k2", 0, u64::MAX, false, true, &[])
            .unwrap()
            .is_empty());

        // Limit and key_only.
        let two = r.scan(b"", b"", 2, u64::MAX, true, false, &[]).unwrap();
        assert_eq!(
            two,
            vec![(b"k1".to_vec(), Vec::new()), (b"k2".to_vec(), Vec::new())]
        );
        let two_rev = r.scan(b"", b"", 2, u64::MAX, true, true, &[]).unwrap();
        assert_eq!(keys(&two_rev), vec![b"k4".to_vec(), b"k2".to_vec()]);
    }

    #[test]
    fn scan_skips_many_versions_with_seek() {
        let e = MemoryEngine::new();
        // 50 versions of "a", 3 of "b", a key whose bytes extend "a" ("a\0").
        for i in 1..=50u64 {
            let v = format!("a{i}").into_bytes();
            must_raw_write(
                &e,
                b"a",
                i * 10,
                Write::new(WriteType::Put, i * 10 - 1, Some(v)),
            );
        }
        for i in 1..=3u64 {
            must_raw_write(
                &e,
                b"b",
                i * 10,
                Write::new(WriteType::Put, i * 10 - 1, Some(vec![b'b'; i as usize])),
            );
        }
        must_raw_write(
            &e,
            b"a\0",
            5,
            Write::new(WriteType::Put, 4, Some(b"z".to_vec())),
        );
        let r = reader(&e);
        for reverse in [false, true] {
            for (ts, a, b) in [
                (u64::MAX, Some(b"a50".to_vec()), Some(b"bbb".to_vec())),
                (255, Some(b"a25".to_vec()), Some(b"bbb".to_vec())),
                (15, Some(b"a1".to_vec()), Some(b"b".to_vec())),
                (9, None, None),
            ] {
                let got = r.scan(b"", b"", 0, ts, false, reverse, &[]).unwrap();
                let mut want = Vec::new();
                if let Some(a) = a {
                    want.push((b"a".to_vec(), a));
                }
                want.push((b"a\0".to_vec(), b"z".to_vec()));
                if let Some(b) = b {
                    want.push((b"b".to_vec(), b));
                }
                if reverse {
                    want.reverse();
                }
                assert_eq!(got, want, "ts {ts} reverse {reverse}");
            }
        }
    }

    #[test]
    fn locks_block_reads() {
        let e = fixture();
        // A Put lock on k2 at 50 with min_commit_ts 60; a Lock-type lock on k1; a pessimistic
        // lock on k4; a Delete lock on a key with no writes ("k0").
        let mut l = lock(LockType::Put, b"k2", 50);
        l.min_commit_ts = 60;
        must_raw_lock(&e, b"k2", &l);
        must_raw_lock(&e, b"k1", &lock(LockType::Lock, b"k1", 45));
        must_raw_lock(&e, b"k4", &lock(LockType::Pessimistic, b"k4", 45));
        must_raw_lock(&e, b"k0", &lock(LockType::Delete, b"k0", 70));
        let r = reader(&e);

        // Lock-type and pessimistic locks never block.
        assert_eq!(r.get(b"k1", 100, &[]).unwrap(), Some(b"v3".to_vec()));
        assert_eq!(r.get(b"k4", 100, &[]).unwrap(), Some(b"v4".to_vec()));
        // Below start_ts: invisible; below min_commit_ts: ignorable.
        assert_eq!(r.get(b"k2", 49, &[]).unwrap(), Some(big(b'x')));
        assert_eq!(r.get(b"k2", 59, &[]).unwrap(), Some(big(b'x')));
        let err = r.get(b"k2", 60, &[]).unwrap_err();
        match err {
            Error::KeyIsLocked(info) => {
                assert_eq!(info.key, b"k2");
                assert_eq!(info.lock_version, 50);
            }
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            r.get(b"k2", u64::MAX, &[]),
            Err(Error::KeyIsLocked(_))
        ));
        // Bypassed.
        assert_eq!(r.get(b"k2", 100, &[50]).unwrap(), Some(big(b'x')));

        // Scans: the lock on k0 (no writes at all) blocks at ts >= 70.
        assert_eq!(
            keys(&r.scan(b"", b"", 0, 55, false, false, &[]).unwrap()).len(),
            3
        );
        let err = r.scan(b"", b"", 0, 80, false, false, &[]).unwrap_err();
        assert!(matches!(err, Error::KeyIsLocked(ref i) if i.key == b"k0"));
        let err = r.scan(b"", b"", 0, 65, false, false, &[]).unwrap_err();
        assert!(matches!(err, Error::KeyIsLocked(ref i) if i.key == b"k2"));
        // Backward the k2 lock is met before k0's.
        let err = r.scan(b"", b"", 0, 80, false, true, &[]).unwrap_err();
        assert!(matches!(err, Error::KeyIsLocked(ref i) if i.key == b"k2"));
        // A limit that stops before the lock avoids it.
        let got = r.scan(b"k1", b"", 1, 80, false, false, &[]).unwrap();
        assert_eq!(keys(&got), vec![b"k1".to_vec()]);
        let got = r.scan(b"", b"", 1, 80, false, true, &[]).unwrap();
        assert_eq!(keys(&got), vec![b"k4".to_vec()]);
        // Out of range locks do not matter; bypass works in scans.
        let got = r.scan(b"k3", b"", 0, 80, false, false, &[]).unwrap();
        assert_eq!(keys(&got), vec![b"k4".to_vec()]);
        let got = r.scan(b"", b"", 0, 80, false, false, &[50, 70]).unwrap();
        assert_eq!(keys(&got).len(), 3);

        // scan_locks.
        let locks = r.scan_locks(b"", b"", u64::MAX, 0).unwrap();
        assert_eq!(
            keys_of_locks(&locks),
            vec![
                b"k0".to_vec(),
                b"k1".to_vec(),
                b"k2".to_vec(),
                b"k4".to_vec()
            ]
        );
        let locks = r.scan_locks(b"", b"", 50, 0).unwrap();
        assert_eq!(
            keys_of_locks(&locks),
            vec![b"k1".to_vec(), b"k2".to_vec(), b"k4".to_vec()]
        );
        let locks = r.scan_locks(b"k1", b"k4", 50, 1).unwrap();
        assert_eq!(keys_of_locks(&locks), vec![b"k1".to_vec()]);
        assert_eq!(locks[0].1.lock_type, LockType::Lock);
    }

    fn keys_of_locks(v: &[(Vec<u8>, Lock)]) -> Vec<Vec<u8>> {
        v.iter().map(|(k, _)| k.clone()).collect()
    }

    #[test]
    fn lock_rule() {
        let mut l = lock(LockType::Put, b"p", 10);
        assert!(lock_blocks_read(&l, 10, &[]));
        assert!(!lock_blocks_read(&l, 9, &[]));
        assert!(!lock_blocks_read(&l, 10, &[10]));
        l.min_commit_ts = 20;
        assert!(!lock_blocks_read(&l, 19, &[]));
        assert!(lock_blocks_read(&l, 20, &[]));
        l.min_commit_ts = u64::MAX;
        assert!(lock_blocks_read(&l, u64::MAX, &[]));
        l.lock_type = LockType::Lock;
        assert!(!lock_blocks_read(&l, u64::MAX, &[]));
    }

    /// Random histories (versions of every type, short and long values, locks of every type)
    /// read through `get` and `scan` in both directions, compared with a brute-force model.
    /// A user key, its versions `(commit_ts, write, value)` newest first, and its lock.
    type ModelKey = (Vec<u8>, Vec<(u64, Write, Vec<u8>)>, Option<Lock>);

    #[test]
    fn reads_match_a_model() {
        let user_keys: Vec<&[u8]> = vec![
            b"",
            b"\0",
            b"a",
            b"a\0",
            b"ab",
            b"abcdefgh",
            b"abcdefgh\0",
            b"abcdefghi",
            b"b",
            b"\xff\xff",
        ];
        for seed in 1..=40u64 {
            let mut rng = Rng::new(seed);
            let e = MemoryEngine::new();
            // Model: per key, (commit_ts, write, value) newest first; and an optional lock.
            let mut model: Vec<ModelKey> = Vec::new();
            for k in &user_keys {
                let mut versions = Vec::new();
                let mut ts = 0;
                for _ in 0..rng.below(12) {
                    ts += 2 + rng.below(6);
                    let (w, v) = match rng.below(6) {
                        0 | 1 => {
                            let v = format!("{k:?}@{ts}").into_bytes();
                            (Write::new(WriteType::Put, ts - 1, Some(v.clone())), v)
                        }
                        2 => {
                            let v = vec![(ts % 251) as u8; 300];
                            must_raw_put_big(&e, k, ts - 1, ts, v.clone());
                            versions.push((ts, Write::new(WriteType::Put, ts - 1, None), v));
                            continue;
                        }
                        3 => (Write::new(WriteType::Delete, ts - 1, None), Vec::new()),
                        4 => (Write::new(WriteType::Lock, ts - 1, None), Vec::new()),
                        _ => (Write::new_rollback(ts, rng.below(2) == 0), Vec::new()),
                    };
                    must_raw_write(&e, k, ts, w.clone());
                    versions.push((ts, w, v));
                }
                versions.reverse();
                let lock = (rng.below(4) == 0).then(|| {
                    let lt = [
                        LockType::Put,
                        LockType::Delete,
                        LockType::Lock,
                        LockType::Pessimistic,
                    ][rng.below(4) as usize];
                    let mut l = lock(lt, b"p", 1 + rng.below(60));
                    l.min_commit_ts = l.start_ts + rng.below(20);
                    must_raw_lock(&e, k, &l);
                    l
                });
                model.push((k.to_vec(), versions, lock));
            }
            let r = reader(&e);
            let visible = |versions: &[(u64, Write, Vec<u8>)], ts: u64| -> Option<Vec<u8>> {
                versions
                    .iter()
                    .filter(|(c, w, _)| *c <= ts && w.is_data_change())
                    .map(|(_, w, v)| (w.write_type == WriteType::Put).then(|| v.clone()))
                    .next()
                    .flatten()
            };
            for _ in 0..30 {
                let ts = if rng.below(5) == 0 {
                    u64::MAX
                } else {
                    rng.below(80)
                };
                let bypass: Vec<u64> = (0..rng.below(3)).map(|_| 1 + rng.below(60)).collect();
                let limit = rng.below(5) as usize;
                let key_only = rng.below(2) == 0;
                let reverse = rng.below(2) == 0;
                let a = rng.below(user_keys.len() as u64 + 1) as usize;
                let b = rng.below(user_keys.len() as u64 + 1) as usize;
                let start: &[u8] = if a == user_keys.len() {
                    b""
                } else {
                    user_keys[a]
                };
                let end: &[u8] = if b == user_keys.len() {
                    b""
                } else {
                    user_keys[b]
                };
                let ctx = format!(
                    "seed {seed} ts {ts} bypass {bypass:?} limit {limit} key_only {key_only} \
                     reverse {reverse} range {start:?}..{end:?}"
                );

                // Point reads.
                for (k, versions, lock) in &model {
                    let got = r.get(k, ts, &bypass);
                    match lock {
                        Some(l) if lock_blocks_read(l, ts, &bypass) => {
                            assert!(matches!(got, Err(Error::KeyIsLocked(_))), "{ctx} {k:?}")
                        }
                        _ => assert_eq!(got.unwrap(), visible(versions, ts), "{ctx} {k:?}"),
                    }
                }

                // Scans.
                let mut in_range: Vec<_> = model
                    .iter()
                    .filter(|(k, _, _)| atoll_keys::in_range(k, start, end))
                    .collect();
                if reverse {
                    in_range.reverse();
                }
                let mut want = Ok(Vec::new());
                for (k, versions, lock) in in_range {
                    let Ok(out) = want.as_mut() else { break };
                    if limit != 0 && out.len() == limit {
                        break;
                    }
                    if let Some(l) = lock {
                        if lock_blocks_read(l, ts, &bypass) {
                            want = Err(k.clone());
                            break;
                        }
                    }
                    if let Some(v) = visible(versions, ts) {
                        out.push((k.clone(), if key_only { Vec::new() } else { v }));
                    }
                }
                let got = r.scan(start, end, limit, ts, key_only, reverse, &bypass);
                match want {
                    Ok(want) => assert_eq!(got.unwrap(), want, "{ctx}"),
                    Err(k) => match got {
                        Err(Error::KeyIsLocked(info)) => assert_eq!(info.key, k, "{ctx}"),
                        other => panic!("{ctx}: expected a lock on {k:?}, got {other:?}"),
                    },
                }
            }
        }
    }
}
