//! Test helpers: run actions against a `MemoryEngine`, applying their mutations with a write
//! batch (what raft apply would do). Helpers that assert start with `must_`.

use atoll_engine::memory::{MemoryEngine, MemorySnapshot};
use atoll_engine::{KvEngine, WriteBatch};
use atoll_proto::kvrpcpb::Op;

use crate::actions::{self, PrewriteParams, TxnStatus};
use crate::errors::Result;
use crate::reader::MvccReader;
use crate::txn::MvccTxn;
use crate::types::{Lock, LockType, Modify, Write, WriteType};

pub type Reader = MvccReader<MemorySnapshot>;

/// Applies `modifies` atomically.
pub fn must_apply(e: &MemoryEngine, modifies: Vec<Modify>) {
    let mut wb = e.write_batch();
    for m in &modifies {
        m.apply_to(&mut wb).unwrap();
    }
    if !wb.is_empty() {
        e.write(wb, false).unwrap();
    }
}

/// Runs `f` for transaction `start_ts` on a fresh snapshot; applies its mutations on success.
pub fn run<T>(
    e: &MemoryEngine,
    start_ts: u64,
    f: impl FnOnce(&mut MvccTxn, &Reader) -> Result<T>,
) -> Result<T> {
    let reader = MvccReader::new(e.snapshot());
    let mut txn = MvccTxn::new(start_ts);
    let out = f(&mut txn, &reader)?;
    must_apply(e, txn.into_modifies());
    Ok(out)
}

pub fn big(fill: u8) -> Vec<u8> {
    vec![fill; crate::types::SHORT_VALUE_MAX_LEN + 1]
}

pub fn lock(lock_type: LockType, primary: &[u8], start_ts: u64) -> Lock {
    Lock::new(lock_type, primary.to_vec(), start_ts, 3000)
}

pub fn keys<V>(pairs: &[(Vec<u8>, V)]) -> Vec<Vec<u8>> {
    pairs.iter().map(|(k, _)| k.clone()).collect()
}

pub fn must_raw_write(e: &MemoryEngine, key: &[u8], commit_ts: u64, write: Write) {
    let mut txn = MvccTxn::new(0);
    txn.put_write(key, commit_ts, &write);
    must_apply(e, txn.into_modifies());
}

pub fn must_raw_put_big(e: &MemoryEngine, key: &[u8], start_ts: u64, commit_ts: u64, v: Vec<u8>) {
    let mut txn = MvccTxn::new(start_ts);
    txn.put_value(key, start_ts, v);
    txn.put_write(key, commit_ts, &Write::new(WriteType::Put, start_ts, None));
    must_apply(e, txn.into_modifies());
}

pub fn must_raw_lock(e: &MemoryEngine, key: &[u8], lock: &Lock) {
    let mut txn = MvccTxn::new(lock.start_ts);
    txn.put_lock(key, lock);
    must_apply(e, txn.into_modifies());
}

pub fn reader(e: &MemoryEngine) -> Reader {
    MvccReader::new(e.snapshot())
}

pub fn params(primary: &[u8], start_ts: u64) -> PrewriteParams {
    PrewriteParams {
        primary: primary.to_vec(),
        start_ts,
        lock_ttl: 3000,
        txn_size: 1,
        ..Default::default()
    }
}

pub fn try_prewrite(
    e: &MemoryEngine,
    p: &PrewriteParams,
    op: Op,
    key: &[u8],
    value: &[u8],
    is_pessimistic_lock: bool,
) -> Result<u64> {
    run(e, p.start_ts, |txn, r| {
        actions::prewrite(txn, r, p, (op, key, value), is_pessimistic_lock)
    })
}

pub fn must_prewrite_put(e: &MemoryEngine, key: &[u8], value: &[u8], primary: &[u8], ts: u64) {
    try_prewrite(e, &params(primary, ts), Op::Put, key, value, false).unwrap();
}

pub fn must_prewrite_delete(e: &MemoryEngine, key: &[u8], primary: &[u8], ts: u64) {
    try_prewrite(e, &params(primary, ts), Op::Del, key, b"", false).unwrap();
}

pub fn must_prewrite_lock(e: &MemoryEngine, key: &[u8], primary: &[u8], ts: u64) {
    try_prewrite(e, &params(primary, ts), Op::Lock, key, b"", false).unwrap();
}

pub fn must_commit(e: &MemoryEngine, key: &[u8], start_ts: u64, commit_ts: u64) {
    run(e, start_ts, |txn, r| {
        actions::commit(txn, r, key, commit_ts)
    })
    .unwrap();
}

pub fn try_commit(e: &MemoryEngine, key: &[u8], start_ts: u64, commit_ts: u64) -> Result<()> {
    run(e, start_ts, |txn, r| {
        actions::commit(txn, r, key, commit_ts)
    })
}

pub fn try_rollback(e: &MemoryEngine, key: &[u8], start_ts: u64, protect: bool) -> Result<()> {
    run(e, start_ts, |txn, r| {
        actions::rollback(txn, r, key, protect)
    })
}

pub fn must_rollback(e: &MemoryEngine, key: &[u8], start_ts: u64, protect: bool) {
    try_rollback(e, key, start_ts, protect).unwrap();
}

pub fn try_check_txn_status(
    e: &MemoryEngine,
    primary: &[u8],
    lock_ts: u64,
    caller_start_ts: u64,
    current_ts: u64,
    rollback_if_not_exist: bool,
) -> Result<TxnStatus> {
    run(e, lock_ts, |txn, r| {
        actions::check_txn_status(
            txn,
            r,
            primary,
            lock_ts,
            caller_start_ts,
            current_ts,
            rollback_if_not_exist,
        )
    })
}

pub fn must_acquire_pessimistic_lock(
    e: &MemoryEngine,
    key: &[u8],
    primary: &[u8],
    start_ts: u64,
    for_update_ts: u64,
) {
    run(e, start_ts, |txn, r| {
        actions::acquire_pessimistic_lock(
            txn,
            r,
            key,
            primary,
            start_ts,
            for_update_ts,
            3000,
            false,
        )
    })
    .unwrap();
}

pub fn must_get(e: &MemoryEngine, key: &[u8], ts: u64) -> Option<Vec<u8>> {
    reader(e).get(key, ts, &[]).unwrap()
}

pub fn must_locked(e: &MemoryEngine, key: &[u8], start_ts: u64) -> Lock {
    let lock = reader(e).load_lock(key).unwrap().expect("locked");
    assert_eq!(lock.start_ts, start_ts);
    lock
}

pub fn must_unlocked(e: &MemoryEngine, key: &[u8]) {
    assert_eq!(reader(e).load_lock(key).unwrap(), None);
}

/// The write record of `key` at `commit_ts`, which must belong to `start_ts`.
pub fn must_written(
    e: &MemoryEngine,
    key: &[u8],
    start_ts: u64,
    commit_ts: u64,
    write_type: WriteType,
) -> Write {
    let (ts, w) = reader(e)
        .seek_write(key, commit_ts)
        .unwrap()
        .expect("written");
    assert_eq!(
        (ts, w.start_ts, w.write_type),
        (commit_ts, start_ts, write_type)
    );
    w
}

/// The rollback record of `start_ts` on `key`, with the expected protection.
pub fn must_rolled_back(e: &MemoryEngine, key: &[u8], start_ts: u64, protected: bool) {
    let w = must_written(e, key, start_ts, start_ts, WriteType::Rollback);
    assert_eq!(w.is_protected(), protected);
}

pub fn must_no_write_at(e: &MemoryEngine, key: &[u8], commit_ts: u64) {
    if let Some((ts, _)) = reader(e).seek_write(key, commit_ts).unwrap() {
        assert_ne!(ts, commit_ts, "unexpected write at {commit_ts}");
    }
}

/// A tiny deterministic PRNG (xorshift64*), so randomized tests need no dependency; tests
/// print the seed on failure.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
