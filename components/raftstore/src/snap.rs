//! Region snapshots as files. A snapshot is generated from a consistent engine snapshot at the
//! apply side's applied index, written as framed batches of key-value pairs, streamed to the
//! receiver in chunks by the transport, and applied on the receiver by the region worker.
//!
//! File format: magic `ATSNAP01`, then frames `[u32 len][SnapshotKvBatch]`, then a zero length
//! and an 8-byte FNV-1a checksum of everything before it.

use crate::{Error, Result};
use atoll_engine::{IterOptions, Iterable, KvEngine, WriteBatch, DATA_CFS};
use atoll_proto::metapb;
use atoll_proto::raft_serverpb::{SnapshotKv, SnapshotKvBatch, SnapshotMeta};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const MAGIC: &[u8; 8] = b"ATSNAP01";
const FRAME_BYTES: usize = 1 << 20;

/// Identifies a snapshot: the region and the raft position it captures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SnapKey {
    pub region_id: u64,
    pub term: u64,
    pub index: u64,
}

impl SnapKey {
    pub fn from_meta(m: &SnapshotMeta) -> Self {
        SnapKey {
            region_id: m.region.as_ref().map_or(0, |r| r.id),
            term: m.term,
            index: m.index,
        }
    }
}

impl std::fmt::Display for SnapKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}_{}_{}", self.region_id, self.term, self.index)
    }
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf29ce484222325)
    }
    fn update(&mut self, b: &[u8]) {
        for x in b {
            self.0 ^= *x as u64;
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
}

#[derive(Clone)]
pub struct SnapManager {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    sending: AtomicUsize,
    receiving: AtomicUsize,
    applying: AtomicUsize,
}

/// Counts an activity for as long as it lives.
pub struct ActivityGuard(Arc<Inner>, u8);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let c = match self.1 {
            0 => &self.0.sending,
            1 => &self.0.receiving,
            _ => &self.0.applying,
        };
        c.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SnapManager {
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Other(format!("snap dir {dir:?}: {e}")))?;
        // Half-written files of a previous run are useless.
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(SnapManager {
            inner: Arc::new(Inner {
                dir,
                sending: AtomicUsize::new(0),
                receiving: AtomicUsize::new(0),
                applying: AtomicUsize::new(0),
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn gen_path(&self, key: &SnapKey) -> PathBuf {
        self.inner.dir.join(format!("gen_{key}.snap"))
    }

    pub fn recv_path(&self, key: &SnapKey) -> PathBuf {
        self.inner.dir.join(format!("rcv_{key}.snap"))
    }

    fn guard(&self, which: u8) -> ActivityGuard {
        let c = match which {
            0 => &self.inner.sending,
            1 => &self.inner.receiving,
            _ => &self.inner.applying,
        };
        c.fetch_add(1, Ordering::Relaxed);
        ActivityGuard(self.inner.clone(), which)
    }

    pub fn sending(&self) -> ActivityGuard {
        self.guard(0)
    }
    pub fn receiving(&self) -> ActivityGuard {
        self.guard(1)
    }
    pub fn applying(&self) -> ActivityGuard {
        self.guard(2)
    }

    /// (sending, receiving, applying) counts.
    pub fn stats(&self) -> (usize, usize, usize) {
        (
            self.inner.sending.load(Ordering::Relaxed),
            self.inner.receiving.load(Ordering::Relaxed),
            self.inner.applying.load(Ordering::Relaxed),
        )
    }

    /// Writes the region's data from `snap` into the generated-snapshot file for `key`.
    /// Returns (file size, key count).
    pub fn build<S: Iterable>(
        &self,
        snap: &S,
        region: &metapb::Region,
        key: &SnapKey,
    ) -> Result<(u64, u64)> {
        let path = self.gen_path(key);
        if let Ok(md) = std::fs::metadata(&path) {
            // Already built for this exact position (a retry): reuse it.
            if let Ok(count) = verify_file(&path) {
                return Ok((md.len(), count));
            }
        }
        let tmp = path.with_extension("snap.tmp");
        let io = |e: std::io::Error| Error::Other(format!("write snapshot {tmp:?}: {e}"));
        let f = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = BufWriter::new(f);
        let mut sum = Fnv::new();
        w.write_all(MAGIC).map_err(io)?;
        sum.update(MAGIC);
        let (start, end) = crate::util::data_bounds(region);
        let mut batch = SnapshotKvBatch::default();
        let mut batch_bytes = 0usize;
        let mut count = 0u64;
        let flush = |batch: &mut SnapshotKvBatch,
                     w: &mut BufWriter<std::fs::File>,
                     sum: &mut Fnv|
         -> Result<()> {
            if batch.kvs.is_empty() {
                return Ok(());
            }
            let bytes = prost::Message::encode_to_vec(batch);
            let len = (bytes.len() as u32).to_le_bytes();
            w.write_all(&len).map_err(io)?;
            w.write_all(&bytes).map_err(io)?;
            sum.update(&len);
            sum.update(&bytes);
            batch.kvs.clear();
            Ok(())
        };
        for (cf_idx, cf) in DATA_CFS.iter().enumerate() {
            let mut it = snap.iterator_cf(
                cf,
                IterOptions::new(Some(start.clone()), Some(end.clone())).no_cache(),
            )?;
            let mut ok = atoll_engine::EngineIterator::seek(&mut it, &start)?;
            while ok {
                let k = atoll_engine::EngineIterator::key(&it);
                let v = atoll_engine::EngineIterator::value(&it);
                batch_bytes += k.len() + v.len();
                batch.kvs.push(SnapshotKv {
                    cf: cf_idx as u32,
                    key: k.to_vec(),
                    value: v.to_vec(),
                });
                count += 1;
                if batch_bytes >= FRAME_BYTES {
                    flush(&mut batch, &mut w, &mut sum)?;
                    batch_bytes = 0;
                }
                ok = atoll_engine::EngineIterator::next(&mut it)?;
            }
        }
        flush(&mut batch, &mut w, &mut sum)?;
        w.write_all(&0u32.to_le_bytes()).map_err(io)?;
        sum.update(&0u32.to_le_bytes());
        w.write_all(&sum.0.to_le_bytes()).map_err(io)?;
        let f = w.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        let size = std::fs::metadata(&path).map_err(io)?.len();
        Ok((size, count))
    }

    /// Replaces the region's data with the snapshot file's content (in bounded batches).
    /// The caller writes the final region/apply states afterwards.
    pub fn apply<E: KvEngine>(
        &self,
        engine: &E,
        region: &metapb::Region,
        path: &Path,
        batch_size: usize,
    ) -> Result<u64> {
        verify_file(path)?;
        let (start, end) = crate::util::data_bounds(region);
        let mut wb = engine.write_batch();
        for cf in DATA_CFS {
            wb.delete_range_cf(cf, &start, &end)?;
        }
        engine.write(wb, false)?;
        let mut wb = engine.write_batch();
        let mut count = 0;
        for_each_batch(path, |batch| {
            for kv in batch.kvs {
                let cf = DATA_CFS
                    .get(kv.cf as usize)
                    .ok_or_else(|| Error::Other(format!("snapshot names unknown cf {}", kv.cf)))?;
                if kv.key < start || kv.key >= end {
                    return Err(Error::Other("snapshot key outside its region".into()));
                }
                wb.put_cf(cf, &kv.key, &kv.value)?;
                count += 1;
            }
            if wb.data_size() >= batch_size {
                let full = std::mem::replace(&mut wb, engine.write_batch());
                engine.write(full, false)?;
            }
            Ok(())
        })?;
        engine.write(wb, false)?;
        Ok(count)
    }

    /// Removes snapshot files older than `max_age`, and every received file of `region_id`
    /// below `keep_index` (applied ones).
    pub fn gc(&self, max_age: Duration) {
        let Ok(rd) = std::fs::read_dir(&self.inner.dir) else {
            return;
        };
        let now = SystemTime::now();
        for e in rd.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default() > max_age)
                .unwrap_or(false);
            if old {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn for_each_batch(path: &Path, mut f: impl FnMut(SnapshotKvBatch) -> Result<()>) -> Result<()> {
    let io = |e: std::io::Error| Error::Other(format!("read snapshot {path:?}: {e}"));
    let mut r = BufReader::new(std::fs::File::open(path).map_err(io)?);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(io)?;
    if &magic != MAGIC {
        return Err(Error::Other(format!("{path:?} is not a snapshot file")));
    }
    let mut buf = vec![];
    loop {
        let mut len = [0u8; 4];
        r.read_exact(&mut len).map_err(io)?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 {
            return Ok(());
        }
        buf.resize(len, 0);
        r.read_exact(&mut buf).map_err(io)?;
        f(prost::Message::decode(buf.as_slice())?)?;
    }
}

/// Checks framing and checksum; returns the number of key-value pairs.
pub fn verify_file(path: &Path) -> Result<u64> {
    let io = |e: std::io::Error| Error::Other(format!("verify snapshot {path:?}: {e}"));
    let data = std::fs::read(path).map_err(io)?;
    if data.len() < MAGIC.len() + 12 || &data[..8] != MAGIC {
        return Err(Error::Other(format!("{path:?} is not a snapshot file")));
    }
    let body = &data[..data.len() - 8];
    let mut sum = Fnv::new();
    sum.update(body);
    let want = u64::from_le_bytes(data[data.len() - 8..].try_into().expect("8 bytes"));
    if sum.0 != want {
        return Err(Error::Other(format!("{path:?}: checksum mismatch")));
    }
    let mut off = 8;
    let mut count = 0u64;
    loop {
        if off + 4 > body.len() {
            return Err(Error::Other(format!("{path:?}: truncated")));
        }
        let len = u32::from_le_bytes(body[off..off + 4].try_into().expect("4 bytes")) as usize;
        off += 4;
        if len == 0 {
            break;
        }
        if off + len > body.len() {
            return Err(Error::Other(format!("{path:?}: truncated frame")));
        }
        let b: SnapshotKvBatch = prost::Message::decode(&body[off..off + len])?;
        count += b.kvs.len() as u64;
        off += len;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use atoll_engine::memory::MemoryEngine;
    use atoll_engine::{Peekable, CF_DEFAULT, CF_WRITE};

    #[test]
    fn build_verify_apply() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = SnapManager::new(dir.path()).unwrap();
        let src = MemoryEngine::new();
        let mut wb = src.write_batch();
        for i in 0..3000u32 {
            let k = atoll_keys::data_key(format!("k{i:05}").as_bytes());
            wb.put_cf(CF_DEFAULT, &k, &[1u8; 500]).unwrap();
            wb.put_cf(CF_WRITE, &k, b"w").unwrap();
        }
        // Outside the region.
        wb.put_cf(CF_DEFAULT, &atoll_keys::data_key(b"z"), b"no")
            .unwrap();
        src.write(wb, true).unwrap();
        let region = metapb::Region {
            id: 7,
            start_key: b"k".to_vec(),
            end_key: b"y".to_vec(),
            ..Default::default()
        };
        let key = SnapKey {
            region_id: 7,
            term: 6,
            index: 10,
        };
        let (size, count) = mgr.build(&src.snapshot(), &region, &key).unwrap();
        assert_eq!(count, 6000);
        assert!(size > 1_500_000);
        assert_eq!(verify_file(&mgr.gen_path(&key)).unwrap(), 6000);

        let dst = MemoryEngine::new();
        let mut wb = dst.write_batch();
        wb.put_cf(CF_DEFAULT, &atoll_keys::data_key(b"k_stale"), b"old")
            .unwrap();
        wb.put_cf(CF_DEFAULT, &atoll_keys::data_key(b"z"), b"other region")
            .unwrap();
        dst.write(wb, true).unwrap();
        assert_eq!(
            mgr.apply(&dst, &region, &mgr.gen_path(&key), 1 << 20)
                .unwrap(),
            6000
        );
        assert!(dst
            .get_value_cf(CF_DEFAULT, &atoll_keys::data_key(b"k_stale"))
            .unwrap()
            .is_none());
        assert!(dst
            .get_value_cf(CF_DEFAULT, &atoll_keys::data_key(b"z"))
            .unwrap()
            .is_some());
        assert!(dst
            .get_value_cf(CF_WRITE, &atoll_keys::data_key(b"k00042"))
            .unwrap()
            .is_some());

        // Corruption is detected.
        let mut bytes = std::fs::read(mgr.gen_path(&key)).unwrap();
        bytes[100] ^= 1;
        std::fs::write(mgr.recv_path(&key), bytes).unwrap();
        assert!(verify_file(&mgr.recv_path(&key)).is_err());
    }

    /// A region that ends at +infinity owns every key from its start, including keys made of
    /// long runs of 0xff (stored as long runs of 0xff): applying a snapshot clears them all.
    #[test]
    fn apply_clears_keys_of_any_length_in_an_unbounded_region() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = SnapManager::new(dir.path()).unwrap();
        let region = metapb::Region {
            id: 8,
            start_key: b"m".to_vec(),
            end_key: vec![],
            ..Default::default()
        };
        let key = SnapKey {
            region_id: 8,
            term: 6,
            index: 10,
        };
        let src = MemoryEngine::new();
        let mut wb = src.write_batch();
        wb.put_cf(CF_DEFAULT, &atoll_keys::data_key(b"n"), b"new")
            .unwrap();
        src.write(wb, true).unwrap();
        mgr.build(&src.snapshot(), &region, &key).unwrap();
        let dst = MemoryEngine::new();
        let mut wb = dst.write_batch();
        let stale: Vec<Vec<u8>> = [1usize, 57, 64, 200]
            .iter()
            .map(|n| atoll_keys::append_ts(atoll_keys::data_key(&vec![0xff; *n]), 3))
            .collect();
        for k in &stale {
            wb.put_cf(CF_WRITE, k, b"old").unwrap();
        }
        dst.write(wb, true).unwrap();
        mgr.apply(&dst, &region, &mgr.gen_path(&key), 1 << 20)
            .unwrap();
        for k in &stale {
            assert!(
                dst.get_value_cf(CF_WRITE, k).unwrap().is_none(),
                "stale key of {} bytes survived",
                k.len()
            );
        }
        assert!(dst
            .get_value_cf(CF_DEFAULT, &atoll_keys::data_key(b"n"))
            .unwrap()
            .is_some());
    }
}
