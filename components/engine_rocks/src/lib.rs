//! The RocksDB implementation of the `atoll-engine` traits: one database per store with the
//! column families `default`, `lock`, `write` (data) and `raft` (logs and local states).
//!
//! Snapshots and iterators are owned (`'static`): each holds an `Arc` of the database so that
//! it can move across threads and outlive the call that made it. The `unsafe` lifetime
//! extensions below are sound because every borrowed handle is declared (and so dropped)
//! before the `Arc` that keeps its database alive.

use atoll_engine::{
    EngineIterator, Error, IterOptions, Iterable, KvEngine, Peekable, Result, Snapshot, WriteBatch,
    ALL_CFS, CF_RAFT,
};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType,
    DBRawIteratorWithThreadMode, DBWithThreadMode, Options, ReadOptions, SingleThreaded,
    SnapshotWithThreadMode, WriteOptions,
};
use std::path::Path;
use std::sync::Arc;

type Db = DBWithThreadMode<SingleThreaded>;

/// Tuning knobs; defaults suit a small machine.
#[derive(Clone, Debug)]
pub struct RocksConfig {
    pub block_cache_size: usize,
    pub write_buffer_size: usize,
    pub raft_write_buffer_size: usize,
    pub max_background_jobs: i32,
    pub max_total_wal_size: u64,
}

impl Default for RocksConfig {
    fn default() -> Self {
        RocksConfig {
            block_cache_size: 256 << 20,
            write_buffer_size: 32 << 20,
            raft_write_buffer_size: 16 << 20,
            max_background_jobs: 2,
            max_total_wal_size: 512 << 20,
        }
    }
}

fn map_err(e: rocksdb::Error) -> Error {
    let msg = e.to_string();
    if msg.contains("No space left") || msg.contains("ENOSPC") {
        return Error::NoSpace(msg);
    }
    match e.kind() {
        rocksdb::ErrorKind::Corruption => Error::Corruption(msg),
        _ => Error::Other(msg),
    }
}

#[derive(Clone)]
pub struct RocksEngine {
    db: Arc<Db>,
    path: Arc<str>,
}

impl RocksEngine {
    pub fn open(path: impl AsRef<Path>, cfg: &RocksConfig) -> Result<Self> {
        let path = path.as_ref();
        std::fs::create_dir_all(path)?;
        let cache = Cache::new_lru_cache(cfg.block_cache_size);
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(cfg.max_background_jobs);
        db_opts.set_max_total_wal_size(cfg.max_total_wal_size);
        db_opts.set_bytes_per_sync(1 << 20);
        db_opts.set_keep_log_file_num(3);
        // The raft pollers and the apply poller write the same memtables at once; letting one
        // write-group leader insert for all is cheaper on few cores than concurrent inserts.
        db_opts.set_allow_concurrent_memtable_write(false);
        db_opts.set_enable_write_thread_adaptive_yield(false);
        db_opts.set_max_log_file_size(16 << 20);
        let cfs = ALL_CFS.iter().map(|name| {
            let mut o = Options::default();
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(&cache);
            table.set_bloom_filter(10.0, false);
            o.set_block_based_table_factory(&table);
            o.set_level_compaction_dynamic_level_bytes(true);
            o.set_compression_per_level(&[
                DBCompressionType::None,
                DBCompressionType::None,
                DBCompressionType::Lz4,
                DBCompressionType::Lz4,
                DBCompressionType::Lz4,
                DBCompressionType::Zstd,
                DBCompressionType::Zstd,
            ]);
            o.set_write_buffer_size(if *name == CF_RAFT {
                cfg.raft_write_buffer_size
            } else {
                cfg.write_buffer_size
            });
            o.set_max_write_buffer_number(4);
            ColumnFamilyDescriptor::new(*name, o)
        });
        let db = Db::open_cf_descriptors(&db_opts, path, cfs).map_err(map_err)?;
        Ok(RocksEngine {
            db: Arc::new(db),
            path: path.to_string_lossy().into(),
        })
    }

    /// A RocksDB integer property of a column family (e.g. `rocksdb.num-entries-active-mem-table`).
    pub fn property_int_cf(&self, cf: &str, name: &str) -> Option<u64> {
        let h = self.cf(cf).ok()?;
        self.db.property_int_value_cf(h, name).ok().flatten()
    }

    /// Engine statistics for status pages: per column family, memtable and table figures.
    pub fn stats(&self) -> Vec<(String, Vec<(String, u64)>)> {
        const PROPS: [&str; 6] = [
            "rocksdb.num-entries-active-mem-table",
            "rocksdb.num-deletes-active-mem-table",
            "rocksdb.cur-size-all-mem-tables",
            "rocksdb.estimate-num-keys",
            "rocksdb.total-sst-files-size",
            "rocksdb.estimate-pending-compaction-bytes",
        ];
        ALL_CFS
            .iter()
            .map(|cf| {
                let v = PROPS
                    .iter()
                    .map(|p| {
                        (
                            p.trim_start_matches("rocksdb.").to_string(),
                            self.property_int_cf(cf, p).unwrap_or(0),
                        )
                    })
                    .collect();
                (cf.to_string(), v)
            })
            .collect()
    }

    fn cf(&self, name: &str) -> Result<&ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| Error::CfNotFound(name.to_string()))
    }
}

fn read_opts(opts: &IterOptions) -> ReadOptions {
    let mut ro = ReadOptions::default();
    if let Some(l) = &opts.lower_bound {
        ro.set_iterate_lower_bound(l.clone());
    }
    if let Some(u) = &opts.upper_bound {
        ro.set_iterate_upper_bound(u.clone());
    }
    ro.fill_cache(opts.fill_cache);
    ro
}

impl Peekable for RocksEngine {
    fn get_value_cf(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let h = self.cf(cf)?;
        self.db.get_cf(h, key).map_err(map_err)
    }
}

impl Iterable for RocksEngine {
    type Iterator = RocksIterator;
    fn iterator_cf(&self, cf: &str, opts: IterOptions) -> Result<RocksIterator> {
        let h = self.cf(cf)?;
        let iter = self.db.raw_iterator_cf_opt(h, read_opts(&opts));
        // SAFETY: `iter` borrows `self.db`; the iterator keeps an Arc of the db and drops
        // `iter` first.
        let iter: DBRawIteratorWithThreadMode<'static, Db> = unsafe { std::mem::transmute(iter) };
        Ok(RocksIterator {
            iter,
            _snap: None,
            _db: self.db.clone(),
        })
    }
}

pub struct RocksWriteBatch {
    db: Arc<Db>,
    wb: rocksdb::WriteBatch,
}

impl WriteBatch for RocksWriteBatch {
    fn put_cf(&mut self, cf: &str, key: &[u8], value: &[u8]) -> Result<()> {
        let h = self
            .db
            .cf_handle(cf)
            .ok_or_else(|| Error::CfNotFound(cf.into()))?;
        self.wb.put_cf(h, key, value);
        Ok(())
    }
    fn delete_cf(&mut self, cf: &str, key: &[u8]) -> Result<()> {
        let h = self
            .db
            .cf_handle(cf)
            .ok_or_else(|| Error::CfNotFound(cf.into()))?;
        self.wb.delete_cf(h, key);
        Ok(())
    }
    fn delete_range_cf(&mut self, cf: &str, start: &[u8], end: &[u8]) -> Result<()> {
        let h = self
            .db
            .cf_handle(cf)
            .ok_or_else(|| Error::CfNotFound(cf.into()))?;
        if start < end {
            self.wb.delete_range_cf(h, start, end);
        }
        Ok(())
    }
    fn count(&self) -> usize {
        self.wb.len()
    }
    fn data_size(&self) -> usize {
        self.wb.size_in_bytes()
    }
    fn clear(&mut self) {
        self.wb.clear();
    }
}

struct SnapInner {
    // Declared before `_db`: dropped first.
    snap: SnapshotWithThreadMode<'static, Db>,
    db: Arc<Db>,
}

#[derive(Clone)]
pub struct RocksSnapshot {
    inner: Arc<SnapInner>,
}

impl Snapshot for RocksSnapshot {}

impl Peekable for RocksSnapshot {
    fn get_value_cf(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let h = self
            .inner
            .db
            .cf_handle(cf)
            .ok_or_else(|| Error::CfNotFound(cf.into()))?;
        self.inner.snap.get_cf(h, key).map_err(map_err)
    }
}

impl Iterable for RocksSnapshot {
    type Iterator = RocksIterator;
    fn iterator_cf(&self, cf: &str, opts: IterOptions) -> Result<RocksIterator> {
        let h = self
            .inner
            .db
            .cf_handle(cf)
            .ok_or_else(|| Error::CfNotFound(cf.into()))?;
        let iter = self.inner.snap.raw_iterator_cf_opt(h, read_opts(&opts));
        // SAFETY: `iter` borrows the snapshot and the db; the iterator holds an Arc of both
        // and drops `iter` first.
        let iter: DBRawIteratorWithThreadMode<'static, Db> = unsafe { std::mem::transmute(iter) };
        Ok(RocksIterator {
            iter,
            _snap: Some(self.inner.clone()),
            _db: self.inner.db.clone(),
        })
    }
}

pub struct RocksIterator {
    // Declared first: dropped before what it borrows.
    iter: DBRawIteratorWithThreadMode<'static, Db>,
    _snap: Option<Arc<SnapInner>>,
    _db: Arc<Db>,
}

impl RocksIterator {
    fn status(&self) -> Result<bool> {
        if self.iter.valid() {
            return Ok(true);
        }
        self.iter.status().map_err(map_err)?;
        Ok(false)
    }
}

impl EngineIterator for RocksIterator {
    fn seek(&mut self, key: &[u8]) -> Result<bool> {
        self.iter.seek(key);
        self.status()
    }
    fn seek_for_prev(&mut self, key: &[u8]) -> Result<bool> {
        self.iter.seek_for_prev(key);
        self.status()
    }
    fn seek_to_first(&mut self) -> Result<bool> {
        self.iter.seek_to_first();
        self.status()
    }
    fn seek_to_last(&mut self) -> Result<bool> {
        self.iter.seek_to_last();
        self.status()
    }
    fn next(&mut self) -> Result<bool> {
        self.iter.next();
        self.status()
    }
    fn prev(&mut self) -> Result<bool> {
        self.iter.prev();
        self.status()
    }
    fn valid(&self) -> Result<bool> {
        self.status()
    }
    fn key(&self) -> &[u8] {
        self.iter.key().expect("key on an invalid iterator")
    }
    fn value(&self) -> &[u8] {
        self.iter.value().expect("value on an invalid iterator")
    }
}

impl KvEngine for RocksEngine {
    type Snapshot = RocksSnapshot;
    type WriteBatch = RocksWriteBatch;

    fn write_batch(&self) -> RocksWriteBatch {
        RocksWriteBatch {
            db: self.db.clone(),
            wb: rocksdb::WriteBatch::default(),
        }
    }

    fn write(&self, wb: RocksWriteBatch, sync: bool) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(wb.wb, &wo).map_err(map_err)
    }

    fn snapshot(&self) -> RocksSnapshot {
        let snap = self.db.snapshot();
        // SAFETY: `snap` borrows the db; SnapInner holds an Arc of it and drops `snap` first.
        let snap: SnapshotWithThreadMode<'static, Db> = unsafe { std::mem::transmute(snap) };
        RocksSnapshot {
            inner: Arc::new(SnapInner {
                snap,
                db: self.db.clone(),
            }),
        }
    }

    fn sync_wal(&self) -> Result<()> {
        self.db.flush_wal(true).map_err(map_err)
    }

    fn approximate_size_cf(&self, cf: &str, start: &[u8], end: Option<&[u8]>) -> Result<u64> {
        let h = self.cf(cf)?;
        // An unbounded end: one past the largest possible key prefix we use.
        let end = end.map(|e| e.to_vec()).unwrap_or_else(|| vec![0xff; 32]);
        let sizes = self
            .db
            .get_approximate_sizes_cf(h, &[rocksdb::Range::new(start, &end)]);
        Ok(sizes.first().copied().unwrap_or(0))
    }

    fn flush(&self) -> Result<()> {
        for cf in ALL_CFS {
            self.db.flush_cf(self.cf(cf)?).map_err(map_err)?;
        }
        Ok(())
    }

    fn compact_range_cf(&self, cf: &str, start: Option<&[u8]>, end: Option<&[u8]>) -> Result<()> {
        let h = self.cf(cf)?;
        self.db.compact_range_cf(h, start, end);
        Ok(())
    }

    fn path(&self) -> &str {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        let dirs = std::cell::RefCell::new(vec![]);
        atoll_engine::conformance::run_all(|| {
            let d = tempfile::tempdir().unwrap();
            let e = RocksEngine::open(d.path(), &RocksConfig::default()).unwrap();
            dirs.borrow_mut().push(d);
            e
        });
    }

    #[test]
    fn reopen_keeps_synced_writes() {
        let d = tempfile::tempdir().unwrap();
        {
            let e = RocksEngine::open(d.path(), &RocksConfig::default()).unwrap();
            let mut wb = e.write_batch();
            wb.put_cf(CF_RAFT, b"k", b"v").unwrap();
            e.write(wb, true).unwrap();
        }
        let e = RocksEngine::open(d.path(), &RocksConfig::default()).unwrap();
        assert_eq!(
            e.get_value_cf(CF_RAFT, b"k").unwrap().as_deref(),
            Some(&b"v"[..])
        );
    }
}

#[cfg(test)]
mod bench_tests {
    use super::*;
    use atoll_engine::{CF_DEFAULT, CF_WRITE};

    /// Not an assertion: prints the cost of apply-like batches (run with --nocapture).
    #[test]
    fn apply_like_batches_cost() {
        let d = tempfile::tempdir().unwrap();
        let e = RocksEngine::open(d.path(), &RocksConfig::default()).unwrap();
        let n = 20_000u64;
        let start = std::time::Instant::now();
        let mut x: u64 = 12345;
        for i in 0..n {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let k = format!("bench/{:010}", x % 10_000);
            let mut wb = e.write_batch();
            let mut dk = k.clone().into_bytes();
            dk.extend_from_slice(&(!i).to_be_bytes());
            wb.put_cf(CF_DEFAULT, &dk, &[7u8; 256]).unwrap();
            wb.put_cf(CF_WRITE, &dk, &[1u8; 24]).unwrap();
            wb.put_cf(
                CF_RAFT,
                &[1, 0, 0, 0, 0, 0, 0, 0, (x % 16) as u8, 3],
                &[2u8; 30],
            )
            .unwrap();
            e.write(wb, false).unwrap();
        }
        let per = start.elapsed() / n as u32;
        eprintln!("apply-like batch of 3 puts: {per:?} each");
    }
}
