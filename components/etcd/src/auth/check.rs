//! What each call needs ([`Need`]s), as etcd checks it (`server/etcdserver/apply/auth.go`),
//! for etcd's KV requests and for Atoll's own KV service (`kvrpcpb.Kv`).

use super::Need;
use atoll_proto::etcdserverpb::{
    request_op, DeleteRangeRequest, PutRequest, RangeRequest, TxnRequest,
};
use atoll_proto::kvrpcpb;

/// etcd's `Range`: read on the range.
pub fn range(r: &RangeRequest, out: &mut Vec<Need>) {
    out.push(Need::read(&r.key, &r.range_end));
}

/// etcd's `checkPutAuth` (the lease's other keys are checked by the caller, which reads
/// them): write on the key, read too with `prev_kv`.
pub fn put(p: &PutRequest, out: &mut Vec<Need>) {
    out.push(Need::write(&p.key, b""));
    if p.prev_kv {
        out.push(Need::read(&p.key, b""));
    }
}

/// etcd's `DeleteRange`: write on the range, read too with `prev_kv`.
pub fn delete_range(d: &DeleteRangeRequest, out: &mut Vec<Need>) {
    out.push(Need::write(&d.key, &d.range_end));
    if d.prev_kv {
        out.push(Need::read(&d.key, &d.range_end));
    }
}

/// etcd's `checkTxnPermission`: read on every compared key or range, and every operation of
/// both branches as if it ran alone, nested txns included.
pub fn txn(t: &TxnRequest, out: &mut Vec<Need>) {
    for c in &t.compare {
        out.push(Need::read(&c.key, &c.range_end));
    }
    for op in t.success.iter().chain(t.failure.iter()) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => range(r, out),
            Some(request_op::Request::RequestPut(p)) => put(p, out),
            Some(request_op::Request::RequestDeleteRange(d)) => delete_range(d, out),
            Some(request_op::Request::RequestTxn(t)) => txn(t, out),
            None => {}
        }
    }
}

/// A range of Atoll's API (`[start, end)`, `end` empty for no end) in etcd's form.
fn atoll_range(start: &[u8], end: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if end.is_empty() {
        (start.to_vec(), vec![0])
    } else {
        (start.to_vec(), end.to_vec())
    }
}

fn read_range(start: &[u8], end: &[u8]) -> Need {
    let (s, e) = atoll_range(start, end);
    Need::read(&s, &e)
}

fn write_range(start: &[u8], end: &[u8]) -> Need {
    let (s, e) = atoll_range(start, end);
    Need::write(&s, &e)
}

fn writes<'a>(keys: impl IntoIterator<Item = &'a Vec<u8>>) -> Vec<Need> {
    keys.into_iter().map(|k| Need::write(k, b"")).collect()
}

/// What a request of Atoll's KV service needs from a user.
pub trait KvNeeds {
    fn needs(&self) -> Vec<Need>;
}

macro_rules! needs {
    ($($t:ty => |$r:ident| $e:expr;)*) => {$(
        impl KvNeeds for $t {
            fn needs(&self) -> Vec<Need> {
                let $r = self;
                $e
            }
        }
    )*};
}

needs! {
    kvrpcpb::GetRequest => |r| vec![Need::read(&r.key, b"")];
    kvrpcpb::BatchGetRequest => |r| r.keys.iter().map(|k| Need::read(k, b"")).collect();
    kvrpcpb::ScanRequest => |r| vec![read_range(&r.start_key, &r.end_key)];
    kvrpcpb::PutRequest => |r| vec![Need::write(&r.key, b"")];
    kvrpcpb::BatchPutRequest => |r| writes(r.pairs.iter().map(|p| &p.key));
    kvrpcpb::DeleteRequest => |r| vec![Need::write(&r.key, b"")];
    kvrpcpb::DeleteRangeRequest => |r| vec![write_range(&r.start_key, &r.end_key)];
    // It reads the value it compares.
    kvrpcpb::CompareAndSwapRequest => |r| vec![Need::read(&r.key, b""), Need::write(&r.key, b"")];
    kvrpcpb::PrewriteRequest => |r| writes(r.mutations.iter().map(|m| &m.key));
    kvrpcpb::CommitRequest => |r| writes(&r.keys);
    kvrpcpb::BatchRollbackRequest => |r| writes(&r.keys);
    // A reader meeting a lock resolves it: the outcome is the lock owner's, whoever asks.
    kvrpcpb::CheckTxnStatusRequest => |_r| vec![Need::User];
    kvrpcpb::CheckSecondaryLocksRequest => |_r| vec![Need::User];
    kvrpcpb::ResolveLockRequest => |_r| vec![Need::User];
    kvrpcpb::TxnHeartBeatRequest => |r| vec![Need::write(&r.primary_lock, b"")];
    kvrpcpb::PessimisticLockRequest => |r| writes(r.mutations.iter().map(|m| &m.key));
    kvrpcpb::PessimisticRollbackRequest => |r| writes(&r.keys);
    // Lists every lock of a range (GC's business).
    kvrpcpb::ScanLockRequest => |_r| vec![Need::Admin];
    kvrpcpb::EtcdRangeRequest => |r| vec![read_range(&r.start_key, &r.end_key)];
    kvrpcpb::EtcdTxnRequest => |r| {
        let mut out = vec![];
        if let Some(t) = &r.txn {
            txn(t, &mut out);
        }
        out
    };
    kvrpcpb::GcWaitRequest => |_r| vec![Need::Admin];
    kvrpcpb::SplitRegionRequest => |_r| vec![Need::Admin];
    // Lease records are in the system key space: the etcd layer's business (root may).
    kvrpcpb::LeaseKeepAliveRequest => |_r| vec![Need::Admin];
    kvrpcpb::LeaseTimeToLiveRequest => |_r| vec![Need::Admin];
    kvrpcpb::ChangesRequest => |r| vec![read_range(&r.start_key, &r.end_key)];
}

#[cfg(test)]
mod tests {
    use super::*;
    use atoll_proto::etcdserverpb::{Compare, RequestOp};

    fn op(r: request_op::Request) -> RequestOp {
        RequestOp { request: Some(r) }
    }

    #[test]
    fn txn_needs_every_key_nested_too() {
        let inner = TxnRequest {
            compare: vec![],
            success: vec![op(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: b"d".to_vec(),
                    range_end: b"e".to_vec(),
                    prev_kv: true,
                },
            ))],
            failure: vec![],
        };
        let t = TxnRequest {
            compare: vec![Compare {
                key: b"c".to_vec(),
                ..Default::default()
            }],
            success: vec![op(request_op::Request::RequestPut(PutRequest {
                key: b"p".to_vec(),
                ..Default::default()
            }))],
            failure: vec![
                op(request_op::Request::RequestRange(RangeRequest {
                    key: b"r".to_vec(),
                    range_end: vec![0],
                    ..Default::default()
                })),
                op(request_op::Request::RequestTxn(inner)),
            ],
        };
        let mut n = vec![];
        txn(&t, &mut n);
        assert_eq!(
            n,
            vec![
                Need::read(b"c", b""),
                Need::write(b"p", b""),
                Need::read(b"r", b"\0"),
                Need::write(b"d", b"e"),
                Need::read(b"d", b"e"),
            ]
        );
    }

    #[test]
    fn atoll_requests() {
        let scan = kvrpcpb::ScanRequest {
            start_key: b"a".to_vec(),
            ..Default::default()
        };
        assert_eq!(
            scan.needs(),
            vec![Need::read(b"a", b"\0")],
            "no end: open-ended"
        );
        let del = kvrpcpb::DeleteRangeRequest {
            start_key: b"a".to_vec(),
            end_key: b"b".to_vec(),
            ..Default::default()
        };
        assert_eq!(del.needs(), vec![Need::write(b"a", b"b")]);
        assert_eq!(
            kvrpcpb::SplitRegionRequest::default().needs(),
            vec![Need::Admin]
        );
    }
}
