//! MVCC records and their binary encodings.
//!
//! - [`Lock`] lives in `CF_LOCK` at `data_key(user_key)`.
//! - [`Write`] lives in `CF_WRITE` at `append_ts(data_key(user_key), commit_ts)`; a rollback
//!   record sits at `commit_ts == start_ts`.
//! - Values longer than [`SHORT_VALUE_MAX_LEN`] live in `CF_DEFAULT` at
//!   `append_ts(data_key(user_key), start_ts)`; shorter ones are inlined as `short_value`.
//!
//! Both encodings start with a format version byte; a decoder refuses versions, flags and
//! trailing bytes it does not know, so corruption is reported instead of misread.

use atoll_keys::{append_ts, data_key};
use atoll_proto::kvrpcpb::{LockInfo, Op};

use crate::errors::{Error, Result};

/// Values up to this many bytes are stored inline in the lock and the write record;
/// longer values go to `CF_DEFAULT`.
pub const SHORT_VALUE_MAX_LEN: usize = 1024;

/// Number of low bits of a timestamp that hold its logical part.
pub const TSO_PHYSICAL_SHIFT_BITS: u32 = 18;

/// The physical part (milliseconds) of a timestamp.
pub fn physical(ts: u64) -> u64 {
    ts >> TSO_PHYSICAL_SHIFT_BITS
}

/// Builds a timestamp from its physical (ms) and logical parts.
pub fn compose_ts(physical_ms: u64, logical: u64) -> u64 {
    (physical_ms << TSO_PHYSICAL_SHIFT_BITS) | (logical & ((1 << TSO_PHYSICAL_SHIFT_BITS) - 1))
}

/// Whether `value` is stored inline (as a short value) rather than in `CF_DEFAULT`.
pub fn is_short_value(value: &[u8]) -> bool {
    value.len() <= SHORT_VALUE_MAX_LEN
}

/// The `CF_LOCK` key of a user key.
pub fn lock_key(user_key: &[u8]) -> Vec<u8> {
    data_key(user_key)
}

/// The `CF_WRITE` key of a user key's version committed at `commit_ts`.
pub fn write_key(user_key: &[u8], commit_ts: u64) -> Vec<u8> {
    append_ts(data_key(user_key), commit_ts)
}

/// The `CF_DEFAULT` key of a user key's value written by the transaction `start_ts`.
pub fn default_key(user_key: &[u8], start_ts: u64) -> Vec<u8> {
    append_ts(data_key(user_key), start_ts)
}

/// One engine mutation produced by a transaction action. Keys are full engine keys
/// (already `data_key` / `append_ts` encoded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Modify {
    /// Puts `value` at `key` in column family `cf`.
    Put {
        /// Column family.
        cf: &'static str,
        /// Engine key.
        key: Vec<u8>,
        /// Engine value.
        value: Vec<u8>,
    },
    /// Deletes `key` from column family `cf`.
    Delete {
        /// Column family.
        cf: &'static str,
        /// Engine key.
        key: Vec<u8>,
    },
}

impl Modify {
    /// The column family this mutation touches.
    pub fn cf(&self) -> &'static str {
        match self {
            Modify::Put { cf, .. } | Modify::Delete { cf, .. } => cf,
        }
    }

    /// The engine key this mutation touches.
    pub fn key(&self) -> &[u8] {
        match self {
            Modify::Put { key, .. } | Modify::Delete { key, .. } => key,
        }
    }

    /// Approximate bytes this mutation adds to a write batch.
    pub fn size(&self) -> usize {
        match self {
            Modify::Put { key, value, .. } => key.len() + value.len(),
            Modify::Delete { key, .. } => key.len(),
        }
    }

    /// Appends this mutation to an engine write batch.
    pub fn apply_to<W: atoll_engine::WriteBatch + ?Sized>(&self, wb: &mut W) -> Result<()> {
        match self {
            Modify::Put { cf, key, value } => wb.put_cf(cf, key, value)?,
            Modify::Delete { cf, key } => wb.delete_cf(cf, key)?,
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Lock
// ---------------------------------------------------------------------------------------------

/// What a lock will become when its transaction commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LockType {
    /// Writes a value.
    Put,
    /// Deletes the key.
    Delete,
    /// Only locks the key (a `SELECT ... FOR UPDATE` style read lock); commits as a `Lock` write.
    Lock,
    /// A pessimistic lock acquired before prewrite; must be converted by prewrite before commit.
    Pessimistic,
}

impl LockType {
    fn to_byte(self) -> u8 {
        match self {
            LockType::Put => 1,
            LockType::Delete => 2,
            LockType::Lock => 3,
            LockType::Pessimistic => 4,
        }
    }

    fn from_byte(b: u8) -> Result<Self> {
        Ok(match b {
            1 => LockType::Put,
            2 => LockType::Delete,
            3 => LockType::Lock,
            4 => LockType::Pessimistic,
            _ => return Err(Error::Codec(format!("unknown lock type {b}"))),
        })
    }

    /// The protocol `Op` reported in a `LockInfo`.
    pub fn to_op(self) -> Op {
        match self {
            LockType::Put => Op::Put,
            LockType::Delete => Op::Del,
            LockType::Lock => Op::Lock,
            LockType::Pessimistic => Op::PessimisticLock,
        }
    }

    /// The write type this lock commits as (`None` for a pessimistic lock, which never commits).
    pub fn to_write_type(self) -> Option<WriteType> {
        match self {
            LockType::Put => Some(WriteType::Put),
            LockType::Delete => Some(WriteType::Delete),
            LockType::Lock => Some(WriteType::Lock),
            LockType::Pessimistic => None,
        }
    }
}

/// A Percolator lock (one per key, in `CF_LOCK`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lock {
    /// What the lock becomes at commit.
    pub lock_type: LockType,
    /// The transaction's primary key (user key).
    pub primary: Vec<u8>,
    /// The transaction's start timestamp.
    pub start_ts: u64,
    /// Time to live in milliseconds, counted from the physical part of `start_ts`.
    pub ttl: u64,
    /// The value, when it is short enough to be inlined.
    pub short_value: Option<Vec<u8>>,
    /// Non-zero for locks of pessimistic transactions.
    pub for_update_ts: u64,
    /// Number of keys in the transaction (a hint for resolvers).
    pub txn_size: u64,
    /// The transaction may not commit below this timestamp; readers below it may ignore the lock.
    pub min_commit_ts: u64,
    /// Whether the transaction uses async commit.
    pub use_async_commit: bool,
    /// For the primary lock of an async-commit transaction: every secondary key.
    pub secondaries: Vec<Vec<u8>>,
    /// Start timestamps of other transactions rolled back on this key while this lock was held;
    /// if this lock commits at one of them, its write record carries the overlapped rollback.
    pub rollback_ts: Vec<u64>,
    /// For a `Put`: the lease the key is to be attached to, 0 for none.
    pub lease: u64,
}

const LOCK_FORMAT_V1: u8 = 1;
const LOCK_FLAG_SHORT_VALUE: u8 = 1;
const LOCK_FLAG_ASYNC_COMMIT: u8 = 1 << 1;
const LOCK_FLAG_SECONDARIES: u8 = 1 << 2;
const LOCK_FLAG_ROLLBACK_TS: u8 = 1 << 3;
const LOCK_FLAG_LEASE: u8 = 1 << 4;
const LOCK_KNOWN_FLAGS: u8 = LOCK_FLAG_SHORT_VALUE
    | LOCK_FLAG_ASYNC_COMMIT
    | LOCK_FLAG_SECONDARIES
    | LOCK_FLAG_ROLLBACK_TS
    | LOCK_FLAG_LEASE;

impl Lock {
    /// A lock with the given identity and every optional field empty.
    pub fn new(lock_type: LockType, primary: Vec<u8>, start_ts: u64, ttl: u64) -> Lock {
        Lock {
            lock_type,
            primary,
            start_ts,
            ttl,
            short_value: None,
            for_update_ts: 0,
            txn_size: 0,
            min_commit_ts: 0,
            use_async_commit: false,
            secondaries: Vec::new(),
            rollback_ts: Vec::new(),
            lease: 0,
        }
    }

    /// Whether the lock's TTL has passed at `current_ts` (physical parts compared, in ms).
    pub fn is_expired(&self, current_ts: u64) -> bool {
        physical(self.start_ts).saturating_add(self.ttl) < physical(current_ts)
    }

    /// Whether this lock belongs to a pessimistic transaction.
    pub fn is_pessimistic_txn(&self) -> bool {
        self.for_update_ts != 0
    }

    /// Version 1 layout: `[1, lock_type, flags]`, varints `start_ts ttl for_update_ts txn_size
    /// min_commit_ts`, `primary` (varint length + bytes), then per flag: short value,
    /// secondaries (varint count, each length-prefixed), rollback_ts (varint count, varints), lease (varint).
    pub fn encode(&self) -> Vec<u8> {
        let mut flags = 0;
        if self.short_value.is_some() {
            flags |= LOCK_FLAG_SHORT_VALUE;
        }
        if self.use_async_commit {
            flags |= LOCK_FLAG_ASYNC_COMMIT;
        }
        if !self.secondaries.is_empty() {
            flags |= LOCK_FLAG_SECONDARIES;
        }
        if !self.rollback_ts.is_empty() {
            flags |= LOCK_FLAG_ROLLBACK_TS;
        }
        if self.lease != 0 {
            flags |= LOCK_FLAG_LEASE;
        }
        let mut out = Vec::with_capacity(
            32 + self.primary.len() + self.short_value.as_ref().map_or(0, |v| v.len() + 2),
        );
        out.push(LOCK_FORMAT_V1);
        out.push(self.lock_type.to_byte());
        out.push(flags);
        for v in [
            self.start_ts,
            self.ttl,
            self.for_update_ts,
            self.txn_size,
            self.min_commit_ts,
        ] {
            put_varint(&mut out, v);
        }
        put_bytes(&mut out, &self.primary);
        if let Some(v) = &self.short_value {
            put_bytes(&mut out, v);
        }
        if !self.secondaries.is_empty() {
            put_varint(&mut out, self.secondaries.len() as u64);
            for s in &self.secondaries {
                put_bytes(&mut out, s);
            }
        }
        if !self.rollback_ts.is_empty() {
            put_varint(&mut out, self.rollback_ts.len() as u64);
            for ts in &self.rollback_ts {
                put_varint(&mut out, *ts);
            }
        }
        if self.lease != 0 {
            put_varint(&mut out, self.lease);
        }
        out
    }

    /// Decodes [`Lock::encode`]'s output; anything else is an [`Error::Codec`].
    pub fn decode(data: &[u8]) -> Result<Lock> {
        let mut d = Decoder::new(data, "lock");
        let version = d.byte()?;
        if version != LOCK_FORMAT_V1 {
            return Err(Error::Codec(format!(
                "unknown lock format version {version}"
            )));
        }
        let lock_type = LockType::from_byte(d.byte()?)?;
        let flags = d.byte()?;
        if flags & !LOCK_KNOWN_FLAGS != 0 {
            return Err(Error::Codec(format!("unknown lock flags {flags:#x}")));
        }
        let start_ts = d.varint()?;
        let ttl = d.varint()?;
        let for_update_ts = d.varint()?;
        let txn_size = d.varint()?;
        let min_commit_ts = d.varint()?;
        let primary = d.bytes()?;
        let short_value = if flags & LOCK_FLAG_SHORT_VALUE != 0 {
            Some(d.bytes()?)
        } else {
            None
        };
        let mut secondaries = Vec::new();
        if flags & LOCK_FLAG_SECONDARIES != 0 {
            let n = d.count()?;
            secondaries.reserve(n);
            for _ in 0..n {
                secondaries.push(d.bytes()?);
            }
        }
        let mut rollback_ts = Vec::new();
        if flags & LOCK_FLAG_ROLLBACK_TS != 0 {
            let n = d.count()?;
            rollback_ts.reserve(n);
            for _ in 0..n {
                rollback_ts.push(d.varint()?);
            }
        }
        let lease = if flags & LOCK_FLAG_LEASE != 0 {
            d.varint()?
        } else {
            0
        };
        d.finish()?;
        Ok(Lock {
            lock_type,
            primary,
            start_ts,
            ttl,
            short_value,
            for_update_ts,
            txn_size,
            min_commit_ts,
            use_async_commit: flags & LOCK_FLAG_ASYNC_COMMIT != 0,
            secondaries,
            rollback_ts,
            lease,
        })
    }

    /// The protocol description of this lock on `key` (a user key).
    pub fn into_lock_info(self, key: Vec<u8>) -> LockInfo {
        LockInfo {
            primary_lock: self.primary,
            lock_version: self.start_ts,
            key,
            lock_ttl: self.ttl,
            txn_size: self.txn_size,
            lock_type: self.lock_type.to_op() as i32,
            use_async_commit: self.use_async_commit,
            min_commit_ts: self.min_commit_ts,
            secondaries: self.secondaries,
            lock_for_update_ts: self.for_update_ts,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Write
// ---------------------------------------------------------------------------------------------

/// The kind of a write record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WriteType {
    /// A committed value.
    Put,
    /// A committed deletion.
    Delete,
    /// A committed lock-only mutation (no data change).
    Lock,
    /// A rollback marker at `commit_ts == start_ts`.
    Rollback,
}

impl WriteType {
    fn to_byte(self) -> u8 {
        match self {
            WriteType::Put => 1,
            WriteType::Delete => 2,
            WriteType::Lock => 3,
            WriteType::Rollback => 4,
        }
    }

    fn from_byte(b: u8) -> Result<Self> {
        Ok(match b {
            1 => WriteType::Put,
            2 => WriteType::Delete,
            3 => WriteType::Lock,
            4 => WriteType::Rollback,
            _ => return Err(Error::Codec(format!("unknown write type {b}"))),
        })
    }
}

/// A write record (one per committed version or rollback, in `CF_WRITE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// What was committed.
    pub write_type: WriteType,
    /// Start timestamp of the transaction that wrote it.
    pub start_ts: u64,
    /// The value of a `Put` when short; `None` for a `Put` means the value is in `CF_DEFAULT`.
    pub short_value: Option<Vec<u8>>,
    /// Another transaction whose `start_ts` equals this record's `commit_ts` was rolled back
    /// here; its rollback record would have had this same key, so this flag stands for it.
    pub has_overlapped_rollback: bool,
    /// For a `Rollback`: it must not be collapsed (removed when a newer rollback is written).
    pub protected: bool,
    /// For a `Put`: the commit timestamp of the key's first write since it last did not exist
    /// (etcd's `create_revision`); 0 on other records.
    pub create_ts: u64,
    /// For a `Put`: writes of the key since it last did not exist, this one included (etcd's
    /// `version`); 0 on other records.
    pub version: u64,
    /// For a `Put`: the lease the key is attached to (etcd's `lease`), 0 for none.
    pub lease: u64,
}

/// What etcd calls a key's metadata, as of one version of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyMeta {
    /// Commit timestamp of the key's first write since it last did not exist.
    pub create_ts: u64,
    /// Commit timestamp of this version.
    pub mod_ts: u64,
    /// Writes since creation, this one included (1 for a key just created).
    pub version: u64,
    /// Attached lease, 0 for none.
    pub lease: u64,
}

const WRITE_FORMAT_V1: u8 = 1;
const WRITE_FLAG_SHORT_VALUE: u8 = 1;
const WRITE_FLAG_OVERLAPPED_ROLLBACK: u8 = 1 << 1;
const WRITE_FLAG_PROTECTED: u8 = 1 << 2;
const WRITE_FLAG_KEY_META: u8 = 1 << 3;
const WRITE_KNOWN_FLAGS: u8 = WRITE_FLAG_SHORT_VALUE
    | WRITE_FLAG_OVERLAPPED_ROLLBACK
    | WRITE_FLAG_PROTECTED
    | WRITE_FLAG_KEY_META;

impl Write {
    /// A write record with no flags set.
    pub fn new(write_type: WriteType, start_ts: u64, short_value: Option<Vec<u8>>) -> Write {
        Write {
            write_type,
            start_ts,
            short_value,
            has_overlapped_rollback: false,
            protected: false,
            create_ts: 0,
            version: 0,
            lease: 0,
        }
    }

    /// A rollback record of transaction `start_ts`.
    pub fn new_rollback(start_ts: u64, protected: bool) -> Write {
        Write {
            protected,
            ..Write::new(WriteType::Rollback, start_ts, None)
        }
    }

    /// Sets the key metadata of a data record committed at `commit_ts`, after `prev` (the
    /// key's newest data record before it: `Put` or `Delete`, or none). A `Put` after a `Put`
    /// continues its history; after a `Delete` or nothing it starts one (created at
    /// `commit_ts`, version 1). Other records carry none.
    pub fn with_meta(mut self, prev: Option<&Write>, commit_ts: u64, lease: u64) -> Write {
        if self.write_type != WriteType::Put {
            return self;
        }
        match prev {
            Some(p) if p.write_type == WriteType::Put && p.version > 0 => {
                self.create_ts = p.create_ts;
                self.version = p.version + 1;
            }
            _ => {
                self.create_ts = commit_ts;
                self.version = 1;
            }
        }
        self.lease = lease;
        self
    }

    /// The metadata of this record as the version committed at `commit_ts`.
    pub fn meta(&self, commit_ts: u64) -> KeyMeta {
        KeyMeta {
            create_ts: self.create_ts,
            mod_ts: commit_ts,
            version: self.version,
            lease: self.lease,
        }
    }

    /// Whether this record is a rollback that must survive collapsing.
    pub fn is_protected(&self) -> bool {
        self.write_type == WriteType::Rollback && self.protected
    }

    /// Whether this record carries data (a `Put` or a `Delete`), as opposed to `Lock`/`Rollback`.
    pub fn is_data_change(&self) -> bool {
        matches!(self.write_type, WriteType::Put | WriteType::Delete)
    }

    /// Version 1 layout: `[1, write_type, flags]`, varint `start_ts`, then the short value
    /// (varint length + bytes) when its flag is set, then varints `create_ts version lease`
    /// when the key-meta flag is set (a `Put` with a version).
    pub fn encode(&self) -> Vec<u8> {
        let mut flags = 0;
        if self.short_value.is_some() {
            flags |= WRITE_FLAG_SHORT_VALUE;
        }
        if self.has_overlapped_rollback {
            flags |= WRITE_FLAG_OVERLAPPED_ROLLBACK;
        }
        if self.protected {
            flags |= WRITE_FLAG_PROTECTED;
        }
        let has_meta = self.version != 0;
        if has_meta {
            flags |= WRITE_FLAG_KEY_META;
        }
        let mut out = Vec::with_capacity(40 + self.short_value.as_ref().map_or(0, |v| v.len() + 2));
        out.push(WRITE_FORMAT_V1);
        out.push(self.write_type.to_byte());
        out.push(flags);
        put_varint(&mut out, self.start_ts);
        if let Some(v) = &self.short_value {
            put_bytes(&mut out, v);
        }
        if has_meta {
            put_varint(&mut out, self.create_ts);
            put_varint(&mut out, self.version);
            put_varint(&mut out, self.lease);
        }
        out
    }

    /// Decodes [`Write::encode`]'s output; anything else is an [`Error::Codec`].
    pub fn decode(data: &[u8]) -> Result<Write> {
        let mut d = Decoder::new(data, "write");
        let version = d.byte()?;
        if version != WRITE_FORMAT_V1 {
            return Err(Error::Codec(format!(
                "unknown write format version {version}"
            )));
        }
        let write_type = WriteType::from_byte(d.byte()?)?;
        let flags = d.byte()?;
        if flags & !WRITE_KNOWN_FLAGS != 0 {
            return Err(Error::Codec(format!("unknown write flags {flags:#x}")));
        }
        let start_ts = d.varint()?;
        let short_value = if flags & WRITE_FLAG_SHORT_VALUE != 0 {
            Some(d.bytes()?)
        } else {
            None
        };
        let (create_ts, version, lease) = if flags & WRITE_FLAG_KEY_META != 0 {
            (d.varint()?, d.varint()?, d.varint()?)
        } else {
            (0, 0, 0)
        };
        d.finish()?;
        Ok(Write {
            write_type,
            start_ts,
            short_value,
            has_overlapped_rollback: flags & WRITE_FLAG_OVERLAPPED_ROLLBACK != 0,
            protected: flags & WRITE_FLAG_PROTECTED != 0,
            create_ts,
            version,
            lease,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Primitive codec
// ---------------------------------------------------------------------------------------------

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

struct Decoder<'a> {
    data: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Decoder<'a> {
    fn new(data: &'a [u8], what: &'static str) -> Self {
        Decoder { data, pos: 0, what }
    }

    fn truncated(&self) -> Error {
        Error::Codec(format!(
            "{} record truncated at byte {} of {}",
            self.what,
            self.pos,
            self.data.len()
        ))
    }

    fn byte(&mut self) -> Result<u8> {
        let b = *self.data.get(self.pos).ok_or_else(|| self.truncated())?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            if shift == 63 && b > 1 {
                return Err(Error::Codec(format!(
                    "{} record: varint overflow",
                    self.what
                )));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Error::Codec(format!(
            "{} record: varint too long",
            self.what
        )))
    }

    /// A length or element count, checked against the bytes left so that corrupt input
    /// cannot make us allocate wildly.
    fn count(&mut self) -> Result<usize> {
        let n = self.varint()?;
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return Err(self.truncated());
        }
        Ok(n as usize)
    }

    fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = self.count()?;
        let out = self.data[self.pos..self.pos + n].to_vec();
        self.pos += n;
        Ok(out)
    }

    fn finish(&self) -> Result<()> {
        if self.pos != self.data.len() {
            return Err(Error::Codec(format!(
                "{} record has {} trailing bytes",
                self.what,
                self.data.len() - self.pos
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_lock() -> Lock {
        Lock {
            lock_type: LockType::Put,
            primary: b"primary".to_vec(),
            start_ts: compose_ts(1_700_000_000_000, 42),
            ttl: 3000,
            short_value: Some(b"value".to_vec()),
            for_update_ts: u64::MAX,
            txn_size: 17,
            min_commit_ts: 1 << 60,
            use_async_commit: true,
            secondaries: vec![b"s1".to_vec(), Vec::new(), vec![0xff; 300]],
            rollback_ts: vec![0, 1, u64::MAX],
            lease: 0x1234_5678_9abc,
        }
    }

    #[test]
    fn lock_round_trips() {
        let full = full_lock();
        assert_eq!(Lock::decode(&full.encode()).unwrap(), full);
        for lt in [
            LockType::Put,
            LockType::Delete,
            LockType::Lock,
            LockType::Pessimistic,
        ] {
            let l = Lock::new(lt, Vec::new(), 0, 0);
            let enc = l.encode();
            assert_eq!(enc.len(), 9, "a minimal lock is compact");
            assert_eq!(Lock::decode(&enc).unwrap(), l);
        }
        let mut empty_value = Lock::new(LockType::Put, b"p".to_vec(), 5, 1);
        empty_value.short_value = Some(Vec::new());
        assert_eq!(Lock::decode(&empty_value.encode()).unwrap(), empty_value);
    }

    #[test]
    fn write_round_trips() {
        let cases = vec![
            Write::new(WriteType::Put, 7, Some(b"v".to_vec())),
            Write::new(WriteType::Put, 7, Some(Vec::new())),
            Write::new(WriteType::Put, u64::MAX, None),
            Write::new(WriteType::Delete, 1, None),
            Write::new(WriteType::Lock, 0, None),
            Write::new_rollback(99, true),
            Write::new_rollback(99, false),
            Write {
                has_overlapped_rollback: true,
                ..Write::new(WriteType::Put, 3, Some(vec![1; SHORT_VALUE_MAX_LEN]))
            },
            Write::new(WriteType::Put, 3, Some(b"v".to_vec())).with_meta(None, 10, 0),
            Write::new(WriteType::Put, 3, None).with_meta(None, u64::MAX, u64::MAX),
        ];
        for w in cases {
            assert_eq!(Write::decode(&w.encode()).unwrap(), w);
        }
        assert!(Write::new_rollback(1, true).is_protected());
        assert!(!Write::new_rollback(1, false).is_protected());
    }

    /// etcd's create_revision / version rules: a put after a put continues the key's history,
    /// after a delete (or nothing) starts a new one; deletes and locks carry none.
    #[test]
    fn key_meta_follows_etcd() {
        let first = Write::new(WriteType::Put, 1, None).with_meta(None, 10, 7);
        assert_eq!(
            first.meta(10),
            KeyMeta {
                create_ts: 10,
                mod_ts: 10,
                version: 1,
                lease: 7
            }
        );
        let second = Write::new(WriteType::Put, 11, None).with_meta(Some(&first), 20, 0);
        assert_eq!((second.create_ts, second.version, second.lease), (10, 2, 0));
        let del = Write::new(WriteType::Delete, 21, None).with_meta(Some(&second), 30, 0);
        assert_eq!((del.create_ts, del.version), (0, 0));
        let again = Write::new(WriteType::Put, 31, None).with_meta(Some(&del), 40, 0);
        assert_eq!((again.create_ts, again.version), (40, 1));
        let lock = Write::new(WriteType::Lock, 41, None).with_meta(Some(&again), 50, 0);
        assert_eq!(lock.version, 0);
        // A record written without metadata (older code) starts a new history.
        let legacy = Write::new(WriteType::Put, 1, None);
        let after = Write::new(WriteType::Put, 2, None).with_meta(Some(&legacy), 60, 0);
        assert_eq!((after.create_ts, after.version), (60, 1));
    }

    #[test]
    fn decode_rejects_garbage() {
        let lock = full_lock().encode();
        // Every strict prefix is truncated.
        for n in 0..lock.len() {
            assert!(
                matches!(Lock::decode(&lock[..n]), Err(Error::Codec(_))),
                "prefix {n}"
            );
        }
        let mut trailing = lock.clone();
        trailing.push(0);
        assert!(matches!(Lock::decode(&trailing), Err(Error::Codec(_))));
        let mut bad_version = lock.clone();
        bad_version[0] = 2;
        assert!(matches!(Lock::decode(&bad_version), Err(Error::Codec(_))));
        let mut bad_type = lock.clone();
        bad_type[1] = 9;
        assert!(matches!(Lock::decode(&bad_type), Err(Error::Codec(_))));
        let mut bad_flags = lock;
        bad_flags[2] |= 0x80;
        assert!(matches!(Lock::decode(&bad_flags), Err(Error::Codec(_))));

        let w = Write::new(WriteType::Put, 1, Some(b"abc".to_vec())).encode();
        for n in 0..w.len() {
            assert!(matches!(Write::decode(&w[..n]), Err(Error::Codec(_))));
        }
        assert!(matches!(Write::decode(&[1, 5, 0, 1]), Err(Error::Codec(_))));
        assert!(matches!(
            Write::decode(&[1, 1, 0x40, 1]),
            Err(Error::Codec(_))
        ));
        // A varint longer than 64 bits.
        let mut overflow = vec![1, 1, 0];
        overflow.extend_from_slice(&[0xff; 10]);
        assert!(matches!(Write::decode(&overflow), Err(Error::Codec(_))));
        // A huge length prefix does not allocate: it is rejected as truncated.
        let mut huge = vec![1, 1, WRITE_FLAG_SHORT_VALUE, 1];
        put_varint(&mut huge, u64::MAX / 2);
        assert!(matches!(Write::decode(&huge), Err(Error::Codec(_))));
    }

    #[test]
    fn varint_edges() {
        for v in [0, 1, 127, 128, 255, 16383, 16384, u64::MAX / 3, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut d = Decoder::new(&out, "test");
            assert_eq!(d.varint().unwrap(), v);
            d.finish().unwrap();
        }
    }

    #[test]
    fn lock_info_and_expiry() {
        let lock = full_lock();
        let info = lock.clone().into_lock_info(b"k".to_vec());
        assert_eq!(info.primary_lock, b"primary");
        assert_eq!(info.lock_version, lock.start_ts);
        assert_eq!(info.key, b"k");
        assert_eq!(info.lock_ttl, 3000);
        assert_eq!(info.txn_size, 17);
        assert_eq!(info.lock_type, Op::Put as i32);
        assert!(info.use_async_commit);
        assert_eq!(info.min_commit_ts, 1 << 60);
        assert_eq!(info.secondaries, lock.secondaries);
        assert_eq!(info.lock_for_update_ts, u64::MAX);

        let l = Lock::new(LockType::Put, b"p".to_vec(), compose_ts(1000, 5), 100);
        assert!(!l.is_expired(compose_ts(1100, 0)));
        assert!(l.is_expired(compose_ts(1101, 0)));
        assert!(!l.is_expired(0));
        assert_eq!(physical(compose_ts(1234, 77)), 1234);
    }

    #[test]
    fn keys_layout() {
        assert_eq!(lock_key(b"k"), data_key(b"k"));
        assert!(write_key(b"k", 20) < write_key(b"k", 10));
        assert_eq!(default_key(b"k", 5), write_key(b"k", 5));
        assert!(is_short_value(&[0; SHORT_VALUE_MAX_LEN]));
        assert!(!is_short_value(&[0; SHORT_VALUE_MAX_LEN + 1]));
    }
}
