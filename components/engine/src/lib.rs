//! The storage engine abstraction: what the raftstore, the transaction layer and snapshots
//! need from a key-value engine, and an in-memory implementation for fast unit tests.
//! The RocksDB implementation lives in `atoll-engine-rocks`.
//!
//! | module | owns |
//! | --- | --- |
//! | this file | the traits: [`KvEngine`], [`Snapshot`], [`WriteBatch`], [`EngineIterator`] |
//! | [`memory`] | [`memory::MemoryEngine`]: B-tree maps with copy-on-write snapshots |
//! | [`conformance`] | the suite every implementation must pass (run from each one's tests) |
//!
//! Invariants every implementation keeps:
//! - a [`WriteBatch`] is applied atomically across column families, in order;
//! - a write with `sync = true` is durable when it returns, and so is every write before it;
//! - a [`Snapshot`] sees exactly the writes that returned before it was taken;
//! - iterators honour their bounds: `lower_bound` inclusive, `upper_bound` exclusive.

pub mod conformance;
pub mod memory;

/// Column families. Data lives in `default`/`lock`/`write` (MVCC, see `atoll-txn`);
/// raft logs and per-region local states in `raft`.
pub const CF_DEFAULT: &str = "default";
pub const CF_LOCK: &str = "lock";
pub const CF_WRITE: &str = "write";
pub const CF_RAFT: &str = "raft";
pub const DATA_CFS: [&str; 3] = [CF_DEFAULT, CF_LOCK, CF_WRITE];
pub const ALL_CFS: [&str; 4] = [CF_DEFAULT, CF_LOCK, CF_WRITE, CF_RAFT];

/// Index of a data column family in [`DATA_CFS`] (used in snapshot files).
pub fn data_cf_index(cf: &str) -> Option<u32> {
    DATA_CFS.iter().position(|c| *c == cf).map(|i| i as u32)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("column family {0} not found")]
    CfNotFound(String),
    #[error("no space left on the device: {0}")]
    NoSpace(String),
    #[error("corruption: {0}")]
    Corruption(String),
    #[error("engine: {0}")]
    Other(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Clone, Debug, Default)]
pub struct IterOptions {
    /// Inclusive.
    pub lower_bound: Option<Vec<u8>>,
    /// Exclusive.
    pub upper_bound: Option<Vec<u8>>,
    /// Whether blocks read should be cached (false for bulk scans such as snapshots).
    pub fill_cache: bool,
}

impl IterOptions {
    pub fn new(lower: Option<Vec<u8>>, upper: Option<Vec<u8>>) -> Self {
        IterOptions {
            lower_bound: lower,
            upper_bound: upper,
            fill_cache: true,
        }
    }
    pub fn no_cache(mut self) -> Self {
        self.fill_cache = false;
        self
    }
}

/// A positioned cursor. Every move returns whether it now points at an entry.
pub trait EngineIterator: Send {
    /// First entry `>= key` (within bounds).
    fn seek(&mut self, key: &[u8]) -> Result<bool>;
    /// Last entry `<= key` (within bounds).
    fn seek_for_prev(&mut self, key: &[u8]) -> Result<bool>;
    fn seek_to_first(&mut self) -> Result<bool>;
    fn seek_to_last(&mut self) -> Result<bool>;
    fn next(&mut self) -> Result<bool>;
    fn prev(&mut self) -> Result<bool>;
    fn valid(&self) -> Result<bool>;
    /// Only while valid.
    fn key(&self) -> &[u8];
    /// Only while valid.
    fn value(&self) -> &[u8];
}

pub trait Peekable {
    fn get_value_cf(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>>;
}

pub trait Iterable {
    type Iterator: EngineIterator;

    fn iterator_cf(&self, cf: &str, opts: IterOptions) -> Result<Self::Iterator>;

    /// Calls `f` on every entry of `[start, end)` in order until it returns `false`.
    fn scan_cf<F>(
        &self,
        cf: &str,
        start: &[u8],
        end: Option<&[u8]>,
        fill_cache: bool,
        mut f: F,
    ) -> Result<()>
    where
        F: FnMut(&[u8], &[u8]) -> Result<bool>,
    {
        let mut opts = IterOptions::new(Some(start.to_vec()), end.map(|e| e.to_vec()));
        opts.fill_cache = fill_cache;
        let mut it = self.iterator_cf(cf, opts)?;
        let mut ok = it.seek(start)?;
        while ok {
            if !f(it.key(), it.value())? {
                break;
            }
            ok = it.next()?;
        }
        Ok(())
    }
}

/// Mutations applied atomically by [`KvEngine::write`].
pub trait WriteBatch: Send {
    fn put_cf(&mut self, cf: &str, key: &[u8], value: &[u8]) -> Result<()>;
    fn delete_cf(&mut self, cf: &str, key: &[u8]) -> Result<()>;
    /// Deletes `[start, end)`.
    fn delete_range_cf(&mut self, cf: &str, start: &[u8], end: &[u8]) -> Result<()>;
    fn count(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.count() == 0
    }
    /// Approximate bytes of the batch.
    fn data_size(&self) -> usize;
    fn clear(&mut self);
}

/// A consistent, immutable view of the engine; cheap to clone and safe to share.
pub trait Snapshot: Peekable + Iterable + Clone + Send + Sync + 'static {}

pub trait KvEngine: Peekable + Iterable + Clone + Send + Sync + 'static {
    type Snapshot: Snapshot;
    type WriteBatch: WriteBatch;

    fn write_batch(&self) -> Self::WriteBatch;
    /// Applies `wb` atomically; with `sync`, durable (with everything before it) on return.
    fn write(&self, wb: Self::WriteBatch, sync: bool) -> Result<()>;
    fn snapshot(&self) -> Self::Snapshot;
    /// Makes every earlier write durable.
    fn sync_wal(&self) -> Result<()>;
    /// Approximate on-disk bytes of `[start, end)` in `cf` (memtables excluded).
    fn approximate_size_cf(&self, cf: &str, start: &[u8], end: Option<&[u8]>) -> Result<u64>;
    /// Flushes memtables to files.
    fn flush(&self) -> Result<()>;
    /// Compacts `[start, end)` of `cf` (whole range when `None`).
    fn compact_range_cf(&self, cf: &str, start: Option<&[u8]>, end: Option<&[u8]>) -> Result<()>;
    /// Where the engine keeps its files (empty for in-memory engines).
    fn path(&self) -> &str;
}
