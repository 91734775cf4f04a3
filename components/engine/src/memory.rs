//! An in-memory engine for unit tests: one B-tree per column family behind a lock;
//! snapshots share the trees and writers copy them on write (`Arc::make_mut`).

use crate::*;
use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

type Tree = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Clone, Default)]
struct Trees {
    cfs: Vec<(&'static str, Arc<Tree>)>,
}

impl Trees {
    fn new() -> Self {
        Trees {
            cfs: ALL_CFS
                .iter()
                .map(|c| (*c, Arc::new(Tree::new())))
                .collect(),
        }
    }
    fn tree(&self, cf: &str) -> Result<&Arc<Tree>> {
        self.cfs
            .iter()
            .find(|(n, _)| *n == cf)
            .map(|(_, t)| t)
            .ok_or_else(|| Error::CfNotFound(cf.to_string()))
    }
    fn tree_mut(&mut self, cf: &str) -> Result<&mut Tree> {
        self.cfs
            .iter_mut()
            .find(|(n, _)| *n == cf)
            .map(|(_, t)| Arc::make_mut(t))
            .ok_or_else(|| Error::CfNotFound(cf.to_string()))
    }
}

#[derive(Clone)]
pub struct MemoryEngine {
    trees: Arc<RwLock<Trees>>,
}

impl Default for MemoryEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryEngine {
    pub fn new() -> Self {
        MemoryEngine {
            trees: Arc::new(RwLock::new(Trees::new())),
        }
    }
}

#[derive(Clone)]
pub struct MemorySnapshot {
    trees: Arc<Trees>,
}

impl Snapshot for MemorySnapshot {}

impl Peekable for MemorySnapshot {
    fn get_value_cf(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.trees.tree(cf)?.get(key).cloned())
    }
}

impl Iterable for MemorySnapshot {
    type Iterator = MemoryIterator;
    fn iterator_cf(&self, cf: &str, opts: IterOptions) -> Result<MemoryIterator> {
        Ok(MemoryIterator {
            tree: self.trees.tree(cf)?.clone(),
            opts,
            cur: None,
        })
    }
}

impl Peekable for MemoryEngine {
    fn get_value_cf(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.trees.read().tree(cf)?.get(key).cloned())
    }
}

impl Iterable for MemoryEngine {
    type Iterator = MemoryIterator;
    fn iterator_cf(&self, cf: &str, opts: IterOptions) -> Result<MemoryIterator> {
        self.snapshot().iterator_cf(cf, opts)
    }
}

enum Op {
    Put(&'static str, Vec<u8>, Vec<u8>),
    Delete(&'static str, Vec<u8>),
    DeleteRange(&'static str, Vec<u8>, Vec<u8>),
}

#[derive(Default)]
pub struct MemoryWriteBatch {
    ops: Vec<Op>,
    size: usize,
}

fn static_cf(cf: &str) -> Result<&'static str> {
    ALL_CFS
        .iter()
        .find(|c| **c == cf)
        .copied()
        .ok_or_else(|| Error::CfNotFound(cf.to_string()))
}

impl WriteBatch for MemoryWriteBatch {
    fn put_cf(&mut self, cf: &str, key: &[u8], value: &[u8]) -> Result<()> {
        self.size += key.len() + value.len();
        self.ops
            .push(Op::Put(static_cf(cf)?, key.to_vec(), value.to_vec()));
        Ok(())
    }
    fn delete_cf(&mut self, cf: &str, key: &[u8]) -> Result<()> {
        self.size += key.len();
        self.ops.push(Op::Delete(static_cf(cf)?, key.to_vec()));
        Ok(())
    }
    fn delete_range_cf(&mut self, cf: &str, start: &[u8], end: &[u8]) -> Result<()> {
        self.size += start.len() + end.len();
        self.ops.push(Op::DeleteRange(
            static_cf(cf)?,
            start.to_vec(),
            end.to_vec(),
        ));
        Ok(())
    }
    fn count(&self) -> usize {
        self.ops.len()
    }
    fn data_size(&self) -> usize {
        self.size
    }
    fn clear(&mut self) {
        self.ops.clear();
        self.size = 0;
    }
}

impl KvEngine for MemoryEngine {
    type Snapshot = MemorySnapshot;
    type WriteBatch = MemoryWriteBatch;

    fn write_batch(&self) -> MemoryWriteBatch {
        MemoryWriteBatch::default()
    }

    fn write(&self, wb: MemoryWriteBatch, _sync: bool) -> Result<()> {
        let mut trees = self.trees.write();
        for op in wb.ops {
            match op {
                Op::Put(cf, k, v) => {
                    trees.tree_mut(cf)?.insert(k, v);
                }
                Op::Delete(cf, k) => {
                    trees.tree_mut(cf)?.remove(&k);
                }
                Op::DeleteRange(cf, s, e) => {
                    if s < e {
                        let t = trees.tree_mut(cf)?;
                        let doomed: Vec<Vec<u8>> = t.range(s..e).map(|(k, _)| k.clone()).collect();
                        for k in doomed {
                            t.remove(&k);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn snapshot(&self) -> MemorySnapshot {
        MemorySnapshot {
            trees: Arc::new(self.trees.read().clone()),
        }
    }

    fn sync_wal(&self) -> Result<()> {
        Ok(())
    }

    fn approximate_size_cf(&self, cf: &str, start: &[u8], end: Option<&[u8]>) -> Result<u64> {
        let trees = self.trees.read();
        let t = trees.tree(cf)?;
        let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(t.range::<[u8], _>((Bound::Included(start), upper))
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn compact_range_cf(&self, cf: &str, _s: Option<&[u8]>, _e: Option<&[u8]>) -> Result<()> {
        self.trees.read().tree(cf).map(|_| ())
    }

    fn path(&self) -> &str {
        ""
    }
}

/// A cursor over a shared tree; it re-seeks by key on every move (fine for tests).
pub struct MemoryIterator {
    tree: Arc<Tree>,
    opts: IterOptions,
    cur: Option<(Vec<u8>, Vec<u8>)>,
}

impl MemoryIterator {
    fn lower(&self) -> Bound<&[u8]> {
        self.opts
            .lower_bound
            .as_deref()
            .map_or(Bound::Unbounded, Bound::Included)
    }
    fn upper(&self) -> Bound<&[u8]> {
        self.opts
            .upper_bound
            .as_deref()
            .map_or(Bound::Unbounded, Bound::Excluded)
    }
    fn set(&mut self, e: Option<(&Vec<u8>, &Vec<u8>)>) -> bool {
        self.cur = e.map(|(k, v)| (k.clone(), v.clone()));
        self.cur.is_some()
    }
    fn first_from(&mut self, from: Bound<&[u8]>) -> bool {
        let lower = match (from, self.lower()) {
            (Bound::Included(a), Bound::Included(b)) => Bound::Included(a.max(b)),
            (Bound::Excluded(a), Bound::Included(b)) if a >= b => Bound::Excluded(a),
            (_, l @ Bound::Included(_)) => l,
            (f, Bound::Unbounded) => f,
            (f, Bound::Excluded(_)) => f,
        };
        if !range_valid(lower, self.upper()) {
            return self.set(None);
        }
        let tree = self.tree.clone();
        let e = tree.range::<[u8], _>((lower, self.upper())).next();
        self.set(e)
    }
    fn last_until(&mut self, to: Bound<&[u8]>) -> bool {
        let upper = match (to, self.upper()) {
            (Bound::Unbounded, u) => u,
            (t, Bound::Unbounded) => t,
            (Bound::Included(a), Bound::Excluded(b)) if a >= b => Bound::Excluded(b),
            (Bound::Excluded(a), Bound::Excluded(b)) => Bound::Excluded(a.min(b)),
            (t, _) => t,
        };
        if !range_valid(self.lower(), upper) {
            return self.set(None);
        }
        let tree = self.tree.clone();
        let e = tree.range::<[u8], _>((self.lower(), upper)).next_back();
        self.set(e)
    }
}

fn range_valid(lower: Bound<&[u8]>, upper: Bound<&[u8]>) -> bool {
    match (lower, upper) {
        (Bound::Included(a), Bound::Excluded(b)) => a < b,
        (Bound::Included(a), Bound::Included(b)) => a <= b,
        (Bound::Excluded(a), Bound::Excluded(b)) | (Bound::Excluded(a), Bound::Included(b)) => {
            a < b
        }
        _ => true,
    }
}

impl EngineIterator for MemoryIterator {
    fn seek(&mut self, key: &[u8]) -> Result<bool> {
        Ok(self.first_from(Bound::Included(key)))
    }
    fn seek_for_prev(&mut self, key: &[u8]) -> Result<bool> {
        Ok(self.last_until(Bound::Included(key)))
    }
    fn seek_to_first(&mut self) -> Result<bool> {
        Ok(self.first_from(Bound::Unbounded))
    }
    fn seek_to_last(&mut self) -> Result<bool> {
        Ok(self.last_until(Bound::Unbounded))
    }
    fn next(&mut self) -> Result<bool> {
        let k = self.cur.take().expect("next on an invalid iterator").0;
        Ok(self.first_from(Bound::Excluded(&k)))
    }
    fn prev(&mut self) -> Result<bool> {
        let k = self.cur.take().expect("prev on an invalid iterator").0;
        Ok(self.last_until(Bound::Excluded(&k)))
    }
    fn valid(&self) -> Result<bool> {
        Ok(self.cur.is_some())
    }
    fn key(&self) -> &[u8] {
        &self.cur.as_ref().expect("key on an invalid iterator").0
    }
    fn value(&self) -> &[u8] {
        &self.cur.as_ref().expect("value on an invalid iterator").1
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn conformance() {
        crate::conformance::run_all(super::MemoryEngine::new);
    }
}
