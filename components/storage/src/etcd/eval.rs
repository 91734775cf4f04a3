//! etcd's KV semantics over any consistent view of the keys: range options (filters, sort,
//! limit, count, keys only), compares, the checks etcd runs before a txn (duplicate keys,
//! operation limits), and txn execution with the reads of later operations seeing the writes
//! of earlier ones, as etcd's apply does. The region's leader runs it over its MVCC snapshot
//! ([`super::MvccView`]); the etcd API layer runs read-only txns spanning regions over reads
//! made at one timestamp.

use crate::storage::Fail;
use atoll_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use atoll_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use atoll_proto::etcdserverpb::{
    request_op, response_op, Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest,
    TxnResponse,
};
use atoll_proto::mvccpb::KeyValue;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

/// etcd's refusal of a request: the gRPC code and etcd's exact message (`rpctypes`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdError {
    pub code: tonic::Code,
    pub message: &'static str,
}

impl EtcdError {
    const fn new(code: tonic::Code, message: &'static str) -> Self {
        EtcdError { code, message }
    }
}

pub const ERR_EMPTY_KEY: EtcdError = EtcdError::new(
    tonic::Code::InvalidArgument,
    "etcdserver: key is not provided",
);
pub const ERR_KEY_NOT_FOUND: EtcdError =
    EtcdError::new(tonic::Code::InvalidArgument, "etcdserver: key not found");
pub const ERR_VALUE_PROVIDED: EtcdError = EtcdError::new(
    tonic::Code::InvalidArgument,
    "etcdserver: value is provided",
);
pub const ERR_LEASE_PROVIDED: EtcdError = EtcdError::new(
    tonic::Code::InvalidArgument,
    "etcdserver: lease is provided",
);
pub const ERR_TOO_MANY_OPS: EtcdError = EtcdError::new(
    tonic::Code::InvalidArgument,
    "etcdserver: too many operations in txn request",
);
pub const ERR_DUPLICATE_KEY: EtcdError = EtcdError::new(
    tonic::Code::InvalidArgument,
    "etcdserver: duplicate key given in txn request",
);
pub const ERR_LEASE_NOT_FOUND: EtcdError = EtcdError::new(
    tonic::Code::NotFound,
    "etcdserver: requested lease not found",
);
pub const ERR_COMPACTED: EtcdError = EtcdError::new(
    tonic::Code::OutOfRange,
    "etcdserver: mvcc: required revision has been compacted",
);
pub const ERR_FUTURE_REV: EtcdError = EtcdError::new(
    tonic::Code::OutOfRange,
    "etcdserver: mvcc: required revision is a future revision",
);

/// A key range as etcd encodes it: `range_end` empty for the key alone, `"\0"` for every key
/// from `key` on, else `[key, range_end)` (empty when `range_end <= key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    pub start: Vec<u8>,
    pub end: RangeEnd,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeEnd {
    /// The key alone.
    Single,
    /// Up to this key, excluded.
    To(Vec<u8>),
    /// Every key from the start on.
    Unbounded,
}

impl KeyRange {
    /// A range of the user key space: ends reaching into the system key space are cut at
    /// its start ([`atoll_keys::SYSTEM_PREFIX`]), so "every key from here" stops there. (A
    /// system key alone stays itself: the etcd layer refuses it in user requests and uses it
    /// for its own records.)
    pub fn from_etcd(key: &[u8], range_end: &[u8]) -> KeyRange {
        let end = match range_end {
            [] => RangeEnd::Single,
            e => RangeEnd::To(atoll_keys::user_range_end(if e == [0] { &[] } else { e })),
        };
        KeyRange {
            start: key.to_vec(),
            end,
        }
    }

    pub fn single(key: &[u8]) -> KeyRange {
        KeyRange {
            start: key.to_vec(),
            end: RangeEnd::Single,
        }
    }

    pub fn contains(&self, k: &[u8]) -> bool {
        match &self.end {
            RangeEnd::Single => k == self.start.as_slice(),
            RangeEnd::To(e) => k >= self.start.as_slice() && k < e.as_slice(),
            RangeEnd::Unbounded => k >= self.start.as_slice(),
        }
    }

    /// No key can be in it (an inverted range: etcd answers it with nothing).
    pub fn is_empty(&self) -> bool {
        matches!(&self.end, RangeEnd::To(e) if e.as_slice() <= self.start.as_slice())
    }

    /// The range as `[start, end)` in Atoll's convention (empty `end`: unbounded).
    pub fn bounds(&self) -> (Vec<u8>, Vec<u8>) {
        match &self.end {
            RangeEnd::Single => {
                let mut e = self.start.clone();
                e.push(0);
                (self.start.clone(), e)
            }
            RangeEnd::To(e) => (self.start.clone(), e.clone()),
            RangeEnd::Unbounded => (self.start.clone(), vec![]),
        }
    }

    fn btree_bounds(&self) -> (Bound<&[u8]>, Bound<&[u8]>) {
        let lo = Bound::Included(self.start.as_slice());
        match &self.end {
            RangeEnd::Single => (lo, Bound::Included(self.start.as_slice())),
            RangeEnd::To(e) => (lo, Bound::Excluded(e.as_slice())),
            RangeEnd::Unbounded => (lo, Bound::Unbounded),
        }
    }
}

/// A consistent view of the keys at one revision.
pub trait View {
    /// Every live key of `r` with its metadata and value, in key order.
    fn range(&mut self, r: &KeyRange) -> Result<Vec<KeyValue>, Fail>;
}

/// A view already read: the keys of the ranges an operation needs, fetched beforehand at one
/// timestamp. A range it was not given reads as empty.
#[derive(Default)]
pub struct FetchedView {
    kvs: BTreeMap<Vec<u8>, KeyValue>,
}

impl FetchedView {
    pub fn insert(&mut self, kv: KeyValue) {
        self.kvs.insert(kv.key.clone(), kv);
    }
}

impl View for FetchedView {
    fn range(&mut self, r: &KeyRange) -> Result<Vec<KeyValue>, Fail> {
        if r.is_empty() {
            return Ok(vec![]);
        }
        Ok(self
            .kvs
            .range::<[u8], _>(r.btree_bounds())
            .map(|(_, kv)| kv.clone())
            .collect())
    }
}

// ---------------- request checks ----------------

/// etcd's checks of a Range request (`v3rpc.checkRangeRequest`).
pub fn check_range_request(r: &RangeRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(ERR_EMPTY_KEY);
    }
    Ok(())
}

/// etcd's checks of a Put request (`v3rpc.checkPutRequest`).
pub fn check_put_request(r: &PutRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(ERR_EMPTY_KEY);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(ERR_VALUE_PROVIDED);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(ERR_LEASE_PROVIDED);
    }
    Ok(())
}

pub fn check_delete_request(r: &DeleteRangeRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(ERR_EMPTY_KEY);
    }
    Ok(())
}

/// etcd's checks of a Txn request: operation counts (`max_ops` per list, nested lists
/// sharing what is left), keys present, and no key both put twice or put and deleted at one
/// level (`checkTxnRequest`, `checkIntervals`).
pub fn check_txn_request(r: &TxnRequest, max_ops: usize) -> Result<(), EtcdError> {
    check_txn_ops(r, max_ops)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

fn check_txn_ops(r: &TxnRequest, max_ops: usize) -> Result<(), EtcdError> {
    let opc = r.compare.len().max(r.success.len()).max(r.failure.len());
    if opc > max_ops {
        return Err(ERR_TOO_MANY_OPS);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(ERR_EMPTY_KEY);
    }
    for op in r.success.iter().chain(r.failure.iter()) {
        match &op.request {
            Some(request_op::Request::RequestRange(q)) => check_range_request(q)?,
            Some(request_op::Request::RequestPut(q)) => check_put_request(q)?,
            Some(request_op::Request::RequestDeleteRange(q)) => check_delete_request(q)?,
            Some(request_op::Request::RequestTxn(t)) => check_txn_ops(t, max_ops - opc)?,
            // An empty operation: etcd answers "key not found".
            None => return Err(ERR_KEY_NOT_FOUND),
        }
    }
    Ok(())
}

/// The puts and delete ranges of one list of operations (and its nested txns).
fn check_intervals(ops: &[RequestOp]) -> Result<(BTreeSet<Vec<u8>>, Vec<KeyRange>), EtcdError> {
    let mut dels: Vec<KeyRange> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(request_op::Request::RequestDeleteRange(d)) => {
                Some(KeyRange::from_etcd(&d.key, &d.range_end))
            }
            _ => None,
        })
        .collect();
    let deleted = |dels: &[KeyRange], k: &[u8]| dels.iter().any(|d| d.contains(k));
    let mut puts: BTreeSet<Vec<u8>> = BTreeSet::new();
    for op in ops {
        let Some(request_op::Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || deleted(&dels, k) {
                return Err(ERR_DUPLICATE_KEY);
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            // then and else exclude each other: the same key in both is fine.
            if (puts.contains(k) && !puts_then.contains(k)) || deleted(&dels, k) {
                return Err(ERR_DUPLICATE_KEY);
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let Some(request_op::Request::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(&p.key) || deleted(&dels, &p.key) {
            return Err(ERR_DUPLICATE_KEY);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

/// Whether a txn writes nothing, whichever way its compares go.
pub fn txn_is_read_only(t: &TxnRequest) -> bool {
    t.success
        .iter()
        .chain(t.failure.iter())
        .all(|op| match &op.request {
            Some(request_op::Request::RequestRange(_)) | None => true,
            Some(request_op::Request::RequestTxn(t)) => txn_is_read_only(t),
            _ => false,
        })
}

/// Every range a txn may read (compares and range operations, both branches, nested) and
/// every range it may write (puts as single keys, delete ranges): what must lie in one
/// region for it to run there, and what a read-only txn must fetch.
pub fn txn_ranges(t: &TxnRequest, reads: &mut Vec<KeyRange>, writes: &mut Vec<KeyRange>) {
    for c in &t.compare {
        reads.push(KeyRange::from_etcd(&c.key, &c.range_end));
    }
    for op in t.success.iter().chain(t.failure.iter()) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => {
                reads.push(KeyRange::from_etcd(&r.key, &r.range_end))
            }
            Some(request_op::Request::RequestPut(p)) => writes.push(KeyRange::single(&p.key)),
            Some(request_op::Request::RequestDeleteRange(d)) => {
                writes.push(KeyRange::from_etcd(&d.key, &d.range_end))
            }
            Some(request_op::Request::RequestTxn(t)) => txn_ranges(t, reads, writes),
            None => {}
        }
    }
}

// ---------------- range ----------------

/// Whether a Range needs every key of its range before answering (sorting other than by key
/// ascending, or revision filters): no limit can be pushed down then.
pub fn range_needs_all(r: &RangeRequest) -> bool {
    let order = r.sort_order();
    let default_order = order == SortOrder::None
        || (r.sort_target() == SortTarget::Key && order == SortOrder::Ascend);
    !default_order
        || r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0
}

/// How many keys to read for a Range in key order: its limit plus one (to tell `more`), or
/// all (0) when it sorts or filters.
pub fn range_fetch_limit(r: &RangeRequest) -> u64 {
    if range_needs_all(r) || r.limit <= 0 {
        0
    } else {
        r.limit as u64 + 1
    }
}

/// Completes a Range from the keys read in key order (at most [`range_fetch_limit`] of them,
/// none for `count_only`) and the count of every key in the range: etcd's filters, sort,
/// limit and `more`, and keys-only (`executeRange`). The header is left to the caller.
pub fn finish_range(r: &RangeRequest, mut kvs: Vec<KeyValue>, count: u64) -> RangeResponse {
    let keep = |kvs: &mut Vec<KeyValue>, f: &dyn Fn(&KeyValue) -> bool| kvs.retain(f);
    if r.max_mod_revision != 0 {
        keep(&mut kvs, &|kv| kv.mod_revision <= r.max_mod_revision);
    }
    if r.min_mod_revision != 0 {
        keep(&mut kvs, &|kv| kv.mod_revision >= r.min_mod_revision);
    }
    if r.max_create_revision != 0 {
        keep(&mut kvs, &|kv| kv.create_revision <= r.max_create_revision);
    }
    if r.min_create_revision != 0 {
        keep(&mut kvs, &|kv| kv.create_revision >= r.min_create_revision);
    }
    let mut order = r.sort_order();
    let target = r.sort_target();
    if target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    } else if target == SortTarget::Key && order == SortOrder::Ascend {
        order = SortOrder::None;
    }
    if order != SortOrder::None {
        // Stable: equal targets stay in key order (reversed when descending). etcd's sort is
        // not stable, so no client can rely on the order of equal targets either way.
        match target {
            SortTarget::Key => kvs.sort_by(|a, b| a.key.cmp(&b.key)),
            SortTarget::Version => kvs.sort_by_key(|kv| kv.version),
            SortTarget::Create => kvs.sort_by_key(|kv| kv.create_revision),
            SortTarget::Mod => kvs.sort_by_key(|kv| kv.mod_revision),
            SortTarget::Value => kvs.sort_by(|a, b| a.value.cmp(&b.value)),
        }
        if order == SortOrder::Descend {
            kvs.reverse();
        }
    }
    let mut more = false;
    if r.limit > 0 && kvs.len() as u64 > r.limit as u64 {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    if r.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    if r.count_only {
        kvs.clear();
    }
    RangeResponse {
        header: None,
        kvs,
        more,
        count: count as i64,
    }
}

/// A Range over a view (inside a txn): everything read, then finished.
fn range_on(view: &mut dyn View, r: &RangeRequest) -> Result<RangeResponse, Fail> {
    let kvs = view.range(&KeyRange::from_etcd(&r.key, &r.range_end))?;
    let count = kvs.len() as u64;
    Ok(finish_range(r, kvs, count))
}

// ---------------- compares ----------------

/// One compare against the view (`applyCompare`): every key of its range must satisfy it;
/// an empty range compares as a zero key-value, except that a value compare then fails.
pub fn compare(view: &mut dyn View, c: &Compare) -> Result<bool, Fail> {
    let kvs = view.range(&KeyRange::from_etcd(&c.key, &c.range_end))?;
    if kvs.is_empty() {
        if c.target() == CompareTarget::Value {
            return Ok(false);
        }
        return Ok(compare_kv(c, &KeyValue::default()));
    }
    Ok(kvs.iter().all(|kv| compare_kv(c, kv)))
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    let int = |v: i64, target: Option<i64>| v.cmp(&target.unwrap_or(0));
    let ord = match c.target() {
        CompareTarget::Value => {
            let v: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(v)
        }
        CompareTarget::Create => int(
            kv.create_revision,
            match c.target_union {
                Some(TargetUnion::CreateRevision(r)) => Some(r),
                _ => None,
            },
        ),
        CompareTarget::Mod => int(
            kv.mod_revision,
            match c.target_union {
                Some(TargetUnion::ModRevision(r)) => Some(r),
                _ => None,
            },
        ),
        CompareTarget::Version => int(
            kv.version,
            match c.target_union {
                Some(TargetUnion::Version(r)) => Some(r),
                _ => None,
            },
        ),
        CompareTarget::Lease => int(
            kv.lease,
            match c.target_union {
                Some(TargetUnion::Lease(r)) => Some(r),
                _ => None,
            },
        ),
    };
    match c.result() {
        CompareResult::Equal => ord.is_eq(),
        CompareResult::NotEqual => !ord.is_eq(),
        CompareResult::Greater => ord.is_gt(),
        CompareResult::Less => ord.is_lt(),
    }
}

// ---------------- txn ----------------

/// One key a txn writes: a value with its lease, or a delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnWrite {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub lease: i64,
}

/// What a txn decided: its answer (header unset) and its writes, in key order.
#[derive(Debug)]
pub struct TxnOutcome {
    pub resp: TxnResponse,
    pub writes: Vec<TxnWrite>,
}

/// The txn's reads after its own earlier writes: a view with the pending writes laid over.
struct Overlay<'a> {
    base: &'a mut dyn View,
    rev: i64,
    /// key -> the write and the key-value it replaced (if any).
    pending: BTreeMap<Vec<u8>, (Option<KeyValue>, Option<KeyValue>)>,
}

impl Overlay<'_> {
    fn current(&mut self, key: &[u8]) -> Result<Option<KeyValue>, Fail> {
        if let Some((now, _)) = self.pending.get(key) {
            return Ok(now.clone());
        }
        Ok(self.base.range(&KeyRange::single(key))?.pop())
    }

    fn put(&mut self, key: &[u8], value: Vec<u8>, lease: i64) -> Result<(), Fail> {
        let before = match self.pending.get(key) {
            Some((_, before)) => before.clone(),
            None => self.base.range(&KeyRange::single(key))?.pop(),
        };
        // Metadata from the version before the txn (a key is put at most once per txn).
        let kv = KeyValue {
            key: key.to_vec(),
            create_revision: before.as_ref().map_or(self.rev, |b| b.create_revision),
            mod_revision: self.rev,
            version: before.as_ref().map_or(1, |b| b.version + 1),
            value,
            lease,
        };
        self.pending.insert(key.to_vec(), (Some(kv), before));
        Ok(())
    }

    fn delete(&mut self, kvs: &[KeyValue]) {
        for kv in kvs {
            let before = match self.pending.remove(&kv.key) {
                Some((_, before)) => before,
                None => Some(kv.clone()),
            };
            self.pending.insert(kv.key.clone(), (None, before));
        }
    }

    fn writes(self) -> Vec<TxnWrite> {
        self.pending
            .into_iter()
            .filter_map(|(key, (now, before))| match (now, before) {
                (Some(kv), _) => Some(TxnWrite {
                    key,
                    value: Some(kv.value),
                    lease: kv.lease,
                }),
                // A key the txn created and deleted again: nothing to write.
                (None, None) => None,
                (None, Some(_)) => Some(TxnWrite {
                    key,
                    value: None,
                    lease: 0,
                }),
            })
            .collect()
    }
}

impl View for Overlay<'_> {
    fn range(&mut self, r: &KeyRange) -> Result<Vec<KeyValue>, Fail> {
        if r.is_empty() {
            return Ok(vec![]);
        }
        let mut out: BTreeMap<Vec<u8>, KeyValue> = self
            .base
            .range(r)?
            .into_iter()
            .map(|kv| (kv.key.clone(), kv))
            .collect();
        for (k, (now, _)) in self.pending.range::<[u8], _>(r.btree_bounds()) {
            match now {
                Some(kv) => out.insert(k.clone(), kv.clone()),
                None => out.remove(k),
            };
        }
        Ok(out.into_values().collect())
    }
}

/// Runs a txn (etcd's `Txn`): every compare, nested ones included, is decided on the view as
/// it was before the txn; the checks of the chosen operations (a put that ignores value or
/// lease needs the key; a lease must exist) run on that view too and refuse the whole txn;
/// then the operations run in order, each read seeing the earlier writes. `rev` is the
/// revision the writes will carry; `lease_exists` tells whether a lease id is granted.
pub fn execute_txn(
    view: &mut dyn View,
    txn: &TxnRequest,
    rev: i64,
    lease_exists: &dyn Fn(i64) -> bool,
) -> Result<Result<TxnOutcome, EtcdError>, Fail> {
    let mut path = vec![];
    compare_path(view, txn, &mut path)?;
    if let Err(e) = check_chosen(view, txn, &path, &mut 0, lease_exists)? {
        return Ok(Err(e));
    }
    let mut overlay = Overlay {
        base: view,
        rev,
        pending: BTreeMap::new(),
    };
    let resp = run_chosen(&mut overlay, txn, &path, &mut 0)?;
    Ok(Ok(TxnOutcome {
        resp,
        writes: overlay.writes(),
    }))
}

/// The outcome of every compare on the chosen path, depth first (`compareToPath`).
fn compare_path(view: &mut dyn View, txn: &TxnRequest, path: &mut Vec<bool>) -> Result<(), Fail> {
    let mut ok = true;
    for c in &txn.compare {
        if !compare(view, c)? {
            ok = false;
            break;
        }
    }
    path.push(ok);
    let ops = if ok { &txn.success } else { &txn.failure };
    for op in ops {
        if let Some(request_op::Request::RequestTxn(t)) = &op.request {
            compare_path(view, t, path)?;
        }
    }
    Ok(())
}

fn check_chosen(
    view: &mut dyn View,
    txn: &TxnRequest,
    path: &[bool],
    at: &mut usize,
    lease_exists: &dyn Fn(i64) -> bool,
) -> Result<Result<(), EtcdError>, Fail> {
    let ok = path[*at];
    *at += 1;
    for op in if ok { &txn.success } else { &txn.failure } {
        match &op.request {
            Some(request_op::Request::RequestPut(p)) => {
                if (p.ignore_value || p.ignore_lease)
                    && view.range(&KeyRange::single(&p.key))?.is_empty()
                {
                    return Ok(Err(ERR_KEY_NOT_FOUND));
                }
                if p.lease != 0 && !lease_exists(p.lease) {
                    return Ok(Err(ERR_LEASE_NOT_FOUND));
                }
            }
            Some(request_op::Request::RequestTxn(t)) => {
                if let Err(e) = check_chosen(view, t, path, at, lease_exists)? {
                    return Ok(Err(e));
                }
            }
            _ => {}
        }
    }
    Ok(Ok(()))
}

fn run_chosen(
    ov: &mut Overlay<'_>,
    txn: &TxnRequest,
    path: &[bool],
    at: &mut usize,
) -> Result<TxnResponse, Fail> {
    let ok = path[*at];
    *at += 1;
    let mut responses = vec![];
    for op in if ok { &txn.success } else { &txn.failure } {
        let response = match &op.request {
            Some(request_op::Request::RequestRange(r)) => {
                let mut resp = range_on(ov, r)?;
                resp.header = Some(ResponseHeader::default());
                Some(response_op::Response::ResponseRange(resp))
            }
            Some(request_op::Request::RequestPut(p)) => {
                let prev = ov.current(&p.key)?;
                let value = if p.ignore_value {
                    prev.as_ref().map(|kv| kv.value.clone()).unwrap_or_default()
                } else {
                    p.value.clone()
                };
                let lease = if p.ignore_lease {
                    prev.as_ref().map_or(0, |kv| kv.lease)
                } else {
                    p.lease
                };
                ov.put(&p.key, value, lease)?;
                Some(response_op::Response::ResponsePut(PutResponse {
                    header: Some(ResponseHeader::default()),
                    prev_kv: if p.prev_kv { prev } else { None },
                }))
            }
            Some(request_op::Request::RequestDeleteRange(d)) => {
                let kvs = ov.range(&KeyRange::from_etcd(&d.key, &d.range_end))?;
                ov.delete(&kvs);
                Some(response_op::Response::ResponseDeleteRange(
                    DeleteRangeResponse {
                        header: Some(ResponseHeader::default()),
                        deleted: kvs.len() as i64,
                        prev_kvs: if d.prev_kv { kvs } else { vec![] },
                    },
                ))
            }
            Some(request_op::Request::RequestTxn(t)) => {
                let mut resp = run_chosen(ov, t, path, at)?;
                resp.header = Some(ResponseHeader::default());
                Some(response_op::Response::ResponseTxn(resp))
            }
            None => None,
        };
        responses.push(ResponseOp { response });
    }
    Ok(TxnResponse {
        header: None,
        succeeded: ok,
        responses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{cmp, del_op as del, put_op as put, range_op as get};
    use atoll_proto::etcdserverpb::compare::{CompareResult as R, CompareTarget as T};

    fn kv(k: &str, v: &str, create: i64, m: i64, version: i64) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: v.into(),
            create_revision: create,
            mod_revision: m,
            version,
            lease: 0,
        }
    }

    fn view(kvs: &[KeyValue]) -> FetchedView {
        let mut v = FetchedView::default();
        for kv in kvs {
            v.insert(kv.clone());
        }
        v
    }

    fn run(v: &mut dyn View, t: &TxnRequest) -> TxnOutcome {
        execute_txn(v, t, 100, &|_| false).ok().unwrap().unwrap()
    }

    #[test]
    fn ranges_follow_etcds_encoding() {
        let r = KeyRange::from_etcd(b"a", b"");
        assert!(r.contains(b"a") && !r.contains(b"a\0"));
        let r = KeyRange::from_etcd(b"a", b"\0");
        assert!(r.contains(b"zzz") && !r.contains(b"0"));
        // "Every key from here" stops at the system key space; so does any longer range.
        let sys = atoll_keys::SYSTEM_PREFIX;
        assert_eq!(r.bounds(), (b"a".to_vec(), sys.to_vec()));
        assert!(r.contains(b"\xff\xff") && !r.contains(sys));
        let r = KeyRange::from_etcd(b"a", b"\xff\xff\xff\xff\xff");
        assert_eq!(r.bounds(), (b"a".to_vec(), sys.to_vec()));
        assert!(KeyRange::from_etcd(sys, b"\0").is_empty());
        let r = KeyRange::from_etcd(b"b", b"a");
        assert!(r.is_empty());
        assert!(view(&[kv("a", "1", 1, 1, 1)]).range(&r).unwrap().is_empty());
    }

    #[test]
    fn compares_follow_etcd() {
        let mut v = view(&[kv("a", "x", 5, 7, 2)]);
        let yes = |v: &mut FetchedView, c: Compare| compare(v, &c).ok().unwrap();
        assert!(yes(
            &mut v,
            cmp("a", T::Value, R::Equal, TargetUnion::Value("x".into()))
        ));
        assert!(yes(
            &mut v,
            cmp("a", T::Value, R::Greater, TargetUnion::Value("w".into()))
        ));
        assert!(yes(
            &mut v,
            cmp("a", T::Version, R::Equal, TargetUnion::Version(2))
        ));
        assert!(yes(
            &mut v,
            cmp("a", T::Create, R::Less, TargetUnion::CreateRevision(6))
        ));
        assert!(yes(
            &mut v,
            cmp("a", T::Mod, R::NotEqual, TargetUnion::ModRevision(6))
        ));
        assert!(yes(
            &mut v,
            cmp("a", T::Lease, R::Equal, TargetUnion::Lease(0))
        ));
        // An absent key: a zero key-value, but a value compare always fails.
        assert!(yes(
            &mut v,
            cmp("b", T::Create, R::Equal, TargetUnion::CreateRevision(0))
        ));
        assert!(yes(
            &mut v,
            cmp("b", T::Version, R::Equal, TargetUnion::Version(0))
        ));
        assert!(!yes(
            &mut v,
            cmp("b", T::Value, R::Equal, TargetUnion::Value(vec![]))
        ));
        assert!(!yes(
            &mut v,
            cmp("b", T::Value, R::NotEqual, TargetUnion::Value("q".into()))
        ));
        // A range compare: every key must satisfy it.
        let mut v = view(&[kv("k1", "x", 1, 1, 1), kv("k2", "x", 2, 9, 3)]);
        let mut c = cmp("k", T::Mod, R::Less, TargetUnion::ModRevision(5));
        c.range_end = b"l".to_vec();
        assert!(!yes(&mut v, c.clone()));
        c.target_union = Some(TargetUnion::ModRevision(10));
        assert!(yes(&mut v, c));
    }

    #[test]
    fn txn_reads_see_its_earlier_writes_and_metadata() {
        let mut v = view(&[kv("a", "1", 3, 4, 2), kv("b", "2", 5, 5, 1)]);
        let t = TxnRequest {
            compare: vec![cmp("a", T::Value, R::Equal, TargetUnion::Value("1".into()))],
            success: vec![put("a", "new"), get("a", "c"), del("b", ""), get("a", "c")],
            failure: vec![],
        };
        let out = run(&mut v, &t);
        assert!(out.resp.succeeded);
        let range = |i: usize| match &out.resp.responses[i].response {
            Some(response_op::Response::ResponseRange(r)) => r.clone(),
            other => panic!("{other:?}"),
        };
        let r1 = range(1);
        assert_eq!(r1.count, 2);
        assert_eq!(r1.kvs[0], kv("a", "new", 3, 100, 3));
        assert_eq!(range(3).kvs.len(), 1);
        match &out.resp.responses[0].response {
            Some(response_op::Response::ResponsePut(p)) => {
                assert_eq!(p.prev_kv, Some(kv("a", "1", 3, 4, 2)))
            }
            other => panic!("{other:?}"),
        }
        match &out.resp.responses[2].response {
            Some(response_op::Response::ResponseDeleteRange(d)) => assert_eq!(d.deleted, 1),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            out.writes,
            vec![
                TxnWrite {
                    key: "a".into(),
                    value: Some("new".into()),
                    lease: 0
                },
                TxnWrite {
                    key: "b".into(),
                    value: None,
                    lease: 0
                },
            ]
        );
    }

    #[test]
    fn nested_compares_decide_on_the_state_before_the_txn() {
        let mut v = view(&[]);
        // The outer put creates "a"; the nested compare still sees it absent.
        let inner = TxnRequest {
            compare: vec![cmp("a", T::Version, R::Equal, TargetUnion::Version(0))],
            success: vec![put("x", "absent-before")],
            failure: vec![put("x", "present-before")],
        };
        let t = TxnRequest {
            compare: vec![],
            success: vec![
                put("a", "1"),
                RequestOp {
                    request: Some(request_op::Request::RequestTxn(inner)),
                },
            ],
            failure: vec![],
        };
        let out = run(&mut v, &t);
        assert_eq!(out.writes[1].value.as_deref(), Some(&b"absent-before"[..]));
    }

    #[test]
    fn checks_refuse_the_whole_txn() {
        let mut v = view(&[]);
        let ignore = RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: "a".into(),
                ignore_value: true,
                ..Default::default()
            })),
        };
        let t = TxnRequest {
            compare: vec![],
            success: vec![put("b", "1"), ignore],
            failure: vec![],
        };
        let r = execute_txn(&mut v, &t, 9, &|_| true).ok().unwrap();
        assert_eq!(r.unwrap_err(), ERR_KEY_NOT_FOUND);
        let leased = RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: "a".into(),
                lease: 7,
                ..Default::default()
            })),
        };
        let t = TxnRequest {
            compare: vec![],
            success: vec![leased],
            failure: vec![],
        };
        let r = execute_txn(&mut v, &t, 9, &|_| false).ok().unwrap();
        assert_eq!(r.unwrap_err(), ERR_LEASE_NOT_FOUND);
    }

    #[test]
    fn duplicate_keys_and_op_limits_follow_etcd() {
        let txn = |success: Vec<RequestOp>| TxnRequest {
            compare: vec![],
            success,
            failure: vec![],
        };
        let nested = |success: Vec<RequestOp>, failure: Vec<RequestOp>| RequestOp {
            request: Some(request_op::Request::RequestTxn(TxnRequest {
                compare: vec![],
                success,
                failure,
            })),
        };
        assert_eq!(
            check_txn_request(&txn(vec![put("a", "1"), put("a", "2")]), 128),
            Err(ERR_DUPLICATE_KEY)
        );
        assert_eq!(
            check_txn_request(&txn(vec![put("b", "1"), del("a", "c")]), 128),
            Err(ERR_DUPLICATE_KEY)
        );
        // Two deletes may overlap; a put and a get may share a key.
        assert_eq!(
            check_txn_request(&txn(vec![del("a", "c"), del("b", "d"), get("x", "")]), 128),
            Ok(())
        );
        assert_eq!(
            check_txn_request(&txn(vec![put("x", "1"), get("x", "")]), 128),
            Ok(())
        );
        // Then and else of a nested txn exclude each other.
        assert_eq!(
            check_txn_request(
                &txn(vec![nested(vec![put("a", "1")], vec![put("a", "2")])]),
                128
            ),
            Ok(())
        );
        assert_eq!(
            check_txn_request(
                &txn(vec![put("a", "0"), nested(vec![put("a", "1")], vec![])]),
                128
            ),
            Err(ERR_DUPLICATE_KEY)
        );
        assert_eq!(
            check_txn_request(
                &txn(vec![del("a", "\0"), nested(vec![put("q", "1")], vec![])]),
                128
            ),
            Err(ERR_DUPLICATE_KEY)
        );
        let many: Vec<RequestOp> = (0..129).map(|i| put(format!("k{i}"), "v")).collect();
        assert_eq!(check_txn_request(&txn(many), 128), Err(ERR_TOO_MANY_OPS));
        assert_eq!(
            check_txn_request(&txn(vec![RequestOp { request: None }]), 128),
            Err(ERR_KEY_NOT_FOUND)
        );
        assert_eq!(
            check_txn_request(&txn(vec![put("", "1")]), 128),
            Err(ERR_EMPTY_KEY)
        );
    }

    #[test]
    fn range_options_follow_etcd() {
        let kvs = vec![
            kv("a", "3", 10, 30, 1),
            kv("b", "1", 20, 20, 4),
            kv("c", "2", 5, 40, 2),
        ];
        let base = RangeRequest {
            key: "a".into(),
            range_end: "z".into(),
            ..Default::default()
        };
        let keys = |r: &RangeResponse| -> Vec<String> {
            r.kvs
                .iter()
                .map(|k| String::from_utf8(k.key.clone()).unwrap())
                .collect()
        };
        let mut r = base.clone();
        r.limit = 2;
        let out = finish_range(&r, kvs.clone(), 3);
        assert_eq!(
            (keys(&out), out.more, out.count),
            (vec!["a".into(), "b".into()], true, 3)
        );
        let mut r = base.clone();
        r.sort_target = SortTarget::Mod as i32;
        let out = finish_range(&r, kvs.clone(), 3);
        assert_eq!(
            keys(&out),
            vec!["b", "a", "c"],
            "a target without an order sorts ascending"
        );
        r.sort_order = SortOrder::Descend as i32;
        r.limit = 1;
        let out = finish_range(&r, kvs.clone(), 3);
        assert_eq!((keys(&out), out.more), (vec!["c".into()], true));
        let mut r = base.clone();
        r.sort_target = SortTarget::Value as i32;
        r.sort_order = SortOrder::Ascend as i32;
        assert_eq!(keys(&finish_range(&r, kvs.clone(), 3)), vec!["b", "c", "a"]);
        let mut r = base.clone();
        r.min_create_revision = 10;
        r.max_mod_revision = 30;
        let out = finish_range(&r, kvs.clone(), 3);
        assert_eq!((keys(&out), out.count), (vec!["a".into(), "b".into()], 3));
        let mut r = base.clone();
        r.keys_only = true;
        assert!(finish_range(&r, kvs.clone(), 3)
            .kvs
            .iter()
            .all(|k| k.value.is_empty()));
        let mut r = base;
        r.count_only = true;
        let out = finish_range(&r, vec![], 3);
        assert_eq!((out.kvs.len(), out.count, out.more), (0, 3, false));
        assert!(!range_needs_all(&r) && range_fetch_limit(&r) == 0);
    }
}
