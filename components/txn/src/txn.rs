//! [`MvccTxn`]: the buffer of engine mutations one command produces.
//!
//! Actions read through an [`crate::MvccReader`] (a snapshot) and write only into an
//! `MvccTxn`; the caller turns [`MvccTxn::into_modifies`] into one atomic write (through raft).
//! Locks prewritten in one-phase-commit mode are kept aside (never written to `CF_LOCK`) until
//! [`MvccTxn::commit_one_pc`] turns them into write records.

use atoll_engine::{CF_DEFAULT, CF_LOCK, CF_WRITE};

use crate::errors::{Error, Result};
use crate::types::{default_key, lock_key, write_key, Lock, LockType, Modify, Write};

/// The mutations of one command on behalf of transaction `start_ts`.
#[derive(Debug, Default)]
pub struct MvccTxn {
    /// The transaction the mutations belong to.
    pub start_ts: u64,
    modifies: Vec<Modify>,
    write_size: usize,
    one_pc_locks: Vec<(Vec<u8>, Lock)>,
}

impl MvccTxn {
    /// An empty buffer for transaction `start_ts`.
    pub fn new(start_ts: u64) -> MvccTxn {
        MvccTxn {
            start_ts,
            ..Default::default()
        }
    }

    fn push(&mut self, m: Modify) {
        self.write_size += m.size();
        self.modifies.push(m);
    }

    /// Writes `lock` on `user_key` (in `CF_LOCK`).
    pub fn put_lock(&mut self, user_key: &[u8], lock: &Lock) {
        self.push(Modify::Put {
            cf: CF_LOCK,
            key: lock_key(user_key),
            value: lock.encode(),
        });
    }

    /// Removes the lock on `user_key`.
    pub fn unlock(&mut self, user_key: &[u8]) {
        self.push(Modify::Delete {
            cf: CF_LOCK,
            key: lock_key(user_key),
        });
    }

    /// Writes the write record of `user_key` at `commit_ts`.
    pub fn put_write(&mut self, user_key: &[u8], commit_ts: u64, write: &Write) {
        self.push(Modify::Put {
            cf: CF_WRITE,
            key: write_key(user_key, commit_ts),
            value: write.encode(),
        });
    }

    /// Deletes the write record of `user_key` at `commit_ts`.
    pub fn delete_write(&mut self, user_key: &[u8], commit_ts: u64) {
        self.push(Modify::Delete {
            cf: CF_WRITE,
            key: write_key(user_key, commit_ts),
        });
    }

    /// Writes a (long) value of `user_key` for transaction `start_ts` into `CF_DEFAULT`.
    pub fn put_value(&mut self, user_key: &[u8], start_ts: u64, value: Vec<u8>) {
        self.push(Modify::Put {
            cf: CF_DEFAULT,
            key: default_key(user_key, start_ts),
            value,
        });
    }

    /// Deletes the `CF_DEFAULT` value of `user_key` written by transaction `start_ts`.
    pub fn delete_value(&mut self, user_key: &[u8], start_ts: u64) {
        self.push(Modify::Delete {
            cf: CF_DEFAULT,
            key: default_key(user_key, start_ts),
        });
    }

    /// Keeps a lock prewritten in one-phase mode aside instead of writing it to `CF_LOCK`.
    pub fn put_one_pc_lock(&mut self, user_key: Vec<u8>, lock: Lock) {
        self.one_pc_locks.push((user_key, lock));
    }

    /// The one-phase locks not yet committed.
    pub fn one_pc_locks(&self) -> &[(Vec<u8>, Lock)] {
        &self.one_pc_locks
    }

    /// Commits every one-phase lock at `commit_ts`: each becomes a `Put`/`Delete`/`Lock` write
    /// record (short values inline; long values were already put in `CF_DEFAULT` at `start_ts`
    /// by prewrite).
    ///
    /// Fails with [`Error::CommitTsExpired`] (and changes nothing) if `commit_ts` is below a
    /// lock's `min_commit_ts`: the caller must commit at the maximum `min_commit_ts` returned by
    /// the prewrites.
    pub fn commit_one_pc<S: atoll_engine::Snapshot>(
        &mut self,
        reader: &crate::MvccReader<S>,
        commit_ts: u64,
    ) -> Result<()> {
        if let Some((key, lock)) = self
            .one_pc_locks
            .iter()
            .find(|(_, l)| commit_ts < l.min_commit_ts || commit_ts <= l.start_ts)
        {
            return Err(Error::CommitTsExpired {
                start_ts: lock.start_ts,
                commit_ts,
                key: key.clone(),
                min_commit_ts: lock.min_commit_ts.max(lock.start_ts + 1),
            });
        }
        for (key, lock) in std::mem::take(&mut self.one_pc_locks) {
            // Prewrite never keeps a pessimistic lock aside (it converts it first); should one
            // appear, it has no data to commit, and any CF_LOCK entry was already removed.
            let Some(write_type) = lock.lock_type.to_write_type() else {
                debug_assert!(lock.lock_type != LockType::Pessimistic);
                continue;
            };
            let prev = crate::actions::data_predecessor(reader, &key, write_type)?;
            let mut write = Write::new(write_type, lock.start_ts, lock.short_value).with_meta(
                prev.as_ref(),
                commit_ts,
                lock.lease,
            );
            write.has_overlapped_rollback = lock.rollback_ts.contains(&commit_ts);
            self.put_write(&key, commit_ts, &write);
        }
        Ok(())
    }

    /// The mutations so far.
    pub fn modifies(&self) -> &[Modify] {
        &self.modifies
    }

    /// Approximate bytes of the mutations so far.
    pub fn write_size(&self) -> usize {
        self.write_size
    }

    /// Whether there is nothing to write (and no one-phase lock pending).
    pub fn is_empty(&self) -> bool {
        self.modifies.is_empty() && self.one_pc_locks.is_empty()
    }

    /// Drops every buffered mutation and pending one-phase lock.
    pub fn clear(&mut self) {
        self.modifies.clear();
        self.one_pc_locks.clear();
        self.write_size = 0;
    }

    /// The mutations to apply atomically. One-phase locks never committed with
    /// [`MvccTxn::commit_one_pc`] are dropped: a caller that does not commit them must discard
    /// the whole txn (its `CF_DEFAULT` values would otherwise be orphaned).
    pub fn into_modifies(self) -> Vec<Modify> {
        self.modifies
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::WriteType;

    #[test]
    fn helpers_produce_encoded_keys() {
        let mut txn = MvccTxn::new(10);
        let lock = Lock::new(LockType::Put, b"k".to_vec(), 10, 100);
        txn.put_lock(b"k", &lock);
        txn.unlock(b"k");
        txn.put_write(b"k", 20, &Write::new(WriteType::Delete, 10, None));
        txn.delete_write(b"k", 20);
        txn.put_value(b"k", 10, vec![7; 300]);
        txn.delete_value(b"k", 10);
        assert!(!txn.is_empty());
        let size = txn.write_size();
        assert!(size > 300);
        let m = txn.into_modifies();
        assert_eq!(m.len(), 6);
        assert_eq!(
            m[0],
            Modify::Put {
                cf: CF_LOCK,
                key: lock_key(b"k"),
                value: lock.encode()
            }
        );
        assert_eq!(m[1].cf(), CF_LOCK);
        assert_eq!(m[2].key(), write_key(b"k", 20).as_slice());
        assert_eq!(m[3].cf(), CF_WRITE);
        assert_eq!(m[4].key(), default_key(b"k", 10).as_slice());
        assert_eq!(m[5].cf(), CF_DEFAULT);
        assert_eq!(m.iter().map(Modify::size).sum::<usize>(), size);
    }

    fn empty_reader() -> crate::MvccReader<atoll_engine::memory::MemorySnapshot> {
        use atoll_engine::KvEngine;
        crate::MvccReader::new(atoll_engine::memory::MemoryEngine::new().snapshot())
    }

    #[test]
    fn one_pc_commit_turns_locks_into_writes() {
        let mut txn = MvccTxn::new(10);
        let mut put = Lock::new(LockType::Put, b"a".to_vec(), 10, 100);
        put.short_value = Some(b"v".to_vec());
        put.min_commit_ts = 15;
        txn.put_one_pc_lock(b"a".to_vec(), put);
        txn.put_one_pc_lock(
            b"b".to_vec(),
            Lock::new(LockType::Delete, b"a".to_vec(), 10, 100),
        );
        txn.put_one_pc_lock(
            b"c".to_vec(),
            Lock::new(LockType::Lock, b"a".to_vec(), 10, 100),
        );
        assert!(txn.modifies().is_empty() && !txn.is_empty());

        assert!(matches!(
            txn.commit_one_pc(&empty_reader(), 14),
            Err(Error::CommitTsExpired {
                min_commit_ts: 15,
                ..
            })
        ));
        assert_eq!(txn.one_pc_locks().len(), 3);
        txn.commit_one_pc(&empty_reader(), 15).unwrap();
        assert!(txn.one_pc_locks().is_empty());
        let m = txn.into_modifies();
        let writes: Vec<(Vec<u8>, Write)> = m
            .iter()
            .map(|m| match m {
                Modify::Put { cf, key, value } => {
                    assert_eq!(*cf, CF_WRITE);
                    (key.clone(), Write::decode(value).unwrap())
                }
                Modify::Delete { .. } => panic!("unexpected delete"),
            })
            .collect();
        assert_eq!(
            writes,
            vec![
                (
                    write_key(b"a", 15),
                    // A first write: created at its commit, version 1.
                    Write::new(WriteType::Put, 10, Some(b"v".to_vec())).with_meta(None, 15, 0)
                ),
                (write_key(b"b", 15), Write::new(WriteType::Delete, 10, None)),
                (write_key(b"c", 15), Write::new(WriteType::Lock, 10, None)),
            ]
        );
    }

    #[test]
    fn clear_drops_everything() {
        let mut txn = MvccTxn::new(1);
        txn.unlock(b"k");
        txn.put_one_pc_lock(b"k".to_vec(), Lock::new(LockType::Put, b"k".to_vec(), 1, 1));
        txn.clear();
        assert!(txn.is_empty());
        assert_eq!(txn.write_size(), 0);
    }
}
