//! Key layout and codecs.
//!
//! | module | owns |
//! | --- | --- |
//! | [`codec`] | memcomparable byte encoding (order-preserving, self-delimiting) and descending timestamps |
//! | this file | where everything lives in the engine: data keys in the data column families, and the local keys (raft log, raft/apply/region states, store ident) in the `raft` column family |
//!
//! Invariants:
//! - A user key `k` is stored in the data column families as `z ++ codec::encode_bytes(k)`
//!   (+ an 8-byte descending timestamp in `default` and `write`), so byte order of stored keys
//!   is the order of user keys, then newest version first; a region `[start, end)` of user keys
//!   is the stored range `[data_key(start), data_end(end))` in every data column family.
//! - Every stored data key is below [`DATA_MAX_KEY`] (the prefix byte plus one): that is the
//!   stored end of a region that ends at +infinity, a true bound whatever the user keys hold
//!   (memcomparable encodings of long runs of 0xff bytes are themselves runs of 0xff).
//! - Local keys never mix with data: they live in their own column family.

pub mod codec;

pub use codec::{decode_bytes, encode_bytes, CodecError};

/// Largest user key accepted by default (overridable by configuration).
pub const DEFAULT_MAX_KEY_SIZE: usize = 8 * 1024;
/// Largest value accepted by default.
pub const DEFAULT_MAX_VALUE_SIZE: usize = 8 * 1024 * 1024;

/// The first byte of every stored data key.
pub const DATA_PREFIX: u8 = b'z';
/// Above every stored data key: the stored end of the key space.
pub const DATA_MAX_KEY: &[u8] = &[DATA_PREFIX + 1];

/// Encoded form of a user key as stored in the data column families (without timestamp).
pub fn data_key(user_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + codec::encoded_len(user_key.len()) + 8);
    k.push(DATA_PREFIX);
    codec::encode_bytes_to(user_key, &mut k);
    k
}

/// The user key of a stored data key (`data_key(k)` optionally followed by more bytes, such
/// as a timestamp), and how many bytes of `stored` its encoding took.
pub fn decode_data_key(stored: &[u8]) -> Result<(Vec<u8>, usize), CodecError> {
    match stored.split_first() {
        Some((&DATA_PREFIX, rest)) => {
            let (k, n) = decode_bytes(rest)?;
            Ok((k, n + 1))
        }
        _ => Err(CodecError::BadDataKey(stored.to_vec())),
    }
}

/// The stored start bound of a region (inclusive).
pub fn data_start_key(region_start: &[u8]) -> Vec<u8> {
    data_key(region_start)
}

/// The stored end bound of a region (exclusive); `None` when the region is unbounded.
pub fn data_end_key(region_end: &[u8]) -> Option<Vec<u8>> {
    if region_end.is_empty() {
        None
    } else {
        Some(data_key(region_end))
    }
}

/// The stored end bound of a region (exclusive), [`DATA_MAX_KEY`] when it is unbounded: the
/// bound for deleting or copying a region's data.
pub fn data_end_bound(region_end: &[u8]) -> Vec<u8> {
    data_end_key(region_end).unwrap_or_else(|| DATA_MAX_KEY.to_vec())
}

/// Appends a timestamp so that newer versions sort first.
pub fn append_ts(mut encoded_key: Vec<u8>, ts: u64) -> Vec<u8> {
    encoded_key.extend_from_slice(&(!ts).to_be_bytes());
    encoded_key
}

/// Splits `encoded_key + ts` into the encoded key and the timestamp.
pub fn split_ts(key: &[u8]) -> Result<(&[u8], u64), CodecError> {
    if key.len() < 8 {
        return Err(CodecError::KeyTooShort(key.len()));
    }
    let (k, t) = key.split_at(key.len() - 8);
    let ts = !u64::from_be_bytes(t.try_into().expect("8 bytes"));
    Ok((k, ts))
}

// ---- the system key space ----

/// Where Atoll's own records begin in the user key space: every key from here up (to
/// +infinity) is reserved. They are ordinary MVCC data (replicated, split, moved and
/// garbage-collected like any region's data: that is how leases are sharded), but no client
/// API writes them, and ranges that reach this far are cut here, so no read, watch or delete
/// of the user key space ever meets them. No UTF-8 key starts with 0xff.
pub const SYSTEM_PREFIX: &[u8] = b"\xff\xff\xff\xffatoll/";

/// Whether `key` is in the reserved system key space.
pub fn is_system_key(key: &[u8]) -> bool {
    key >= SYSTEM_PREFIX
}

/// The end of a user range `[start, end)` (empty end = unbounded) cut at the system key
/// space: never empty, never past [`SYSTEM_PREFIX`].
pub fn user_range_end(end: &[u8]) -> Vec<u8> {
    if end.is_empty() || end > SYSTEM_PREFIX {
        SYSTEM_PREFIX.to_vec()
    } else {
        end.to_vec()
    }
}

/// Whether `key` lies in `[start, end)` (empty end = unbounded).
pub fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    key >= start && (end.is_empty() || key < end)
}

/// Whether `[a_start, a_end)` and `[b_start, b_end)` overlap (empty end = unbounded).
pub fn ranges_overlap(a_start: &[u8], a_end: &[u8], b_start: &[u8], b_end: &[u8]) -> bool {
    (b_end.is_empty() || a_start < b_end) && (a_end.is_empty() || b_start < a_end)
}

// ---- local keys (column family `raft`) ----

const RAFT_PREFIX: u8 = 0x01;
const REGION_META_PREFIX: u8 = 0x02;
const STORE_PREFIX: u8 = 0x03;

const LOG_SUFFIX: u8 = 0x01;
const RAFT_STATE_SUFFIX: u8 = 0x02;
const APPLY_STATE_SUFFIX: u8 = 0x03;
const REGION_STATE_SUFFIX: u8 = 0x01;

fn region_prefix(prefix: u8, region_id: u64, suffix: u8, extra: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(10 + extra);
    k.push(prefix);
    k.extend_from_slice(&region_id.to_be_bytes());
    k.push(suffix);
    k
}

/// Raft log entry `index` of `region_id`.
pub fn raft_log_key(region_id: u64, index: u64) -> Vec<u8> {
    let mut k = region_prefix(RAFT_PREFIX, region_id, LOG_SUFFIX, 8);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The index encoded in a raft log key.
pub fn raft_log_index(key: &[u8]) -> Result<u64, CodecError> {
    if key.len() != 18 || key[0] != RAFT_PREFIX || key[9] != LOG_SUFFIX {
        return Err(CodecError::BadLocalKey(key.to_vec()));
    }
    Ok(u64::from_be_bytes(key[10..18].try_into().expect("8 bytes")))
}

/// `[raft_log_key(id, 0), raft_log_key(id, u64::MAX)]` as an exclusive-end range covering all entries.
pub fn raft_log_range(region_id: u64) -> (Vec<u8>, Vec<u8>) {
    (
        region_prefix(RAFT_PREFIX, region_id, LOG_SUFFIX, 0),
        region_prefix(RAFT_PREFIX, region_id, LOG_SUFFIX + 1, 0),
    )
}

pub fn raft_state_key(region_id: u64) -> Vec<u8> {
    region_prefix(RAFT_PREFIX, region_id, RAFT_STATE_SUFFIX, 0)
}

pub fn apply_state_key(region_id: u64) -> Vec<u8> {
    region_prefix(RAFT_PREFIX, region_id, APPLY_STATE_SUFFIX, 0)
}

pub fn region_state_key(region_id: u64) -> Vec<u8> {
    region_prefix(REGION_META_PREFIX, region_id, REGION_STATE_SUFFIX, 0)
}

/// The range holding every region state key.
pub fn region_state_range() -> (Vec<u8>, Vec<u8>) {
    (vec![REGION_META_PREFIX], vec![REGION_META_PREFIX + 1])
}

/// The region id of a region state key.
pub fn region_id_of_state_key(key: &[u8]) -> Result<u64, CodecError> {
    if key.len() != 10 || key[0] != REGION_META_PREFIX || key[9] != REGION_STATE_SUFFIX {
        return Err(CodecError::BadLocalKey(key.to_vec()));
    }
    Ok(u64::from_be_bytes(key[1..9].try_into().expect("8 bytes")))
}

/// Where the store remembers its cluster id and store id.
pub fn store_ident_key() -> Vec<u8> {
    vec![STORE_PREFIX, 0x01]
}

/// Where the store records the format of its data (see [`DATA_FORMAT_VERSION`]).
pub fn data_format_key() -> Vec<u8> {
    vec![STORE_PREFIX, 0x03]
}

/// The on-disk layout this build reads and writes. 1: data keys carry [`DATA_PREFIX`];
/// 2: write records of values carry etcd's key metadata (create timestamp, version, lease).
/// (Data directories written before version 1 have a store ident and no format key.)
pub const DATA_FORMAT_VERSION: u32 = 2;

/// Where the store remembers the last GC safe point it has applied.
pub fn gc_safe_point_key() -> Vec<u8> {
    vec![STORE_PREFIX, 0x02]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ts_sorts_newest_first() {
        let k = data_key(b"k");
        let a = append_ts(k.clone(), 10);
        let b = append_ts(k.clone(), 20);
        assert!(b < a);
        assert_eq!(split_ts(&a).unwrap(), (k.as_slice(), 10));
    }

    #[test]
    fn versions_of_a_key_stay_together() {
        // "a" with any timestamp sorts before "a\0" with any timestamp.
        let a_old = append_ts(data_key(b"a"), 1);
        let a0_new = append_ts(data_key(b"a\x00"), u64::MAX - 1);
        assert!(a_old < a0_new);
        assert!(append_ts(data_key(b"a"), 0) < data_key(b"a\x00"));
    }

    #[test]
    fn every_data_key_is_below_the_max_even_long_runs_of_0xff() {
        for len in [0usize, 1, 7, 8, 56, 57, 64, 100, 1000] {
            let k = vec![0xffu8; len];
            let stored = append_ts(data_key(&k), 0);
            assert!(stored.as_slice() < DATA_MAX_KEY, "len {len}");
            assert!(data_key(&k).as_slice() >= data_key(b"").as_slice());
            let (back, n) = decode_data_key(&stored).unwrap();
            assert_eq!(back, k);
            assert_eq!(n, data_key(&k).len());
        }
        assert_eq!(data_end_bound(b""), DATA_MAX_KEY);
        assert_eq!(data_end_bound(b"m"), data_key(b"m"));
        assert!(decode_data_key(&encode_bytes(b"x")).is_err());
    }

    #[test]
    fn local_keys_round_trip() {
        let k = raft_log_key(7, 42);
        assert_eq!(raft_log_index(&k).unwrap(), 42);
        let (s, e) = raft_log_range(7);
        assert!(s <= k && k < e);
        assert!(raft_log_key(8, 0) >= e);
        assert_eq!(region_id_of_state_key(&region_state_key(9)).unwrap(), 9);
        let (rs, re) = region_state_range();
        assert!(rs <= region_state_key(u64::MAX) && region_state_key(u64::MAX) < re);
    }

    #[test]
    fn ranges() {
        assert!(in_range(b"b", b"a", b"c"));
        assert!(!in_range(b"c", b"a", b"c"));
        assert!(in_range(b"zzz", b"a", b""));
        assert!(ranges_overlap(b"a", b"c", b"b", b""));
        assert!(!ranges_overlap(b"a", b"b", b"b", b"c"));
        assert!(ranges_overlap(b"", b"", b"x", b"y"));
    }
}
