//! The `Kv` gRPC service: a thin shell over [`Storage`], which owns the semantics.
//!
//! With auth enabled every call is checked first ([`AuthStore::authorize`]) for what it
//! touches (`atoll_etcd::auth::check::KvNeeds`): a user's call (token in metadata `token`, or
//! a TLS client certificate's common name) needs the same permissions as through etcd's API,
//! a call without one is refused (`etcdserver: user name is empty`). Calls from storage nodes
//! — this one's own client in process, another's with its store token — are not checked:
//! the etcd layer checked its caller before it called.

use atoll_engine::KvEngine;
use atoll_etcd::auth::check::KvNeeds;
use atoll_etcd::auth::{AuthStore, Caller};
use atoll_proto::kvrpcpb::kv_server::Kv;
use atoll_proto::kvrpcpb::*;
use atoll_storage::Storage;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct KvService<E: KvEngine> {
    storage: Arc<Storage<E>>,
    auth: Arc<AuthStore>,
}

impl<E: KvEngine> KvService<E> {
    pub fn new(storage: Arc<Storage<E>>, auth: Arc<AuthStore>) -> Self {
        KvService { storage, auth }
    }
}

/// Checks a call: a user's (or one naming no user while auth is on) for what it touches.
async fn authorize<T: KvNeeds>(auth: &AuthStore, req: &Request<T>) -> Result<(), Status> {
    let caller = auth.caller_of(req).await?;
    if matches!(caller, Caller::User(_) | Caller::Nobody) {
        auth.check_fresh(&caller, &req.get_ref().needs()).await?;
    }
    Ok(())
}

macro_rules! kv_service {
    (admitted { $($method:ident($req:ty) -> $resp:ty;)* } unadmitted { $($own:ident($oreq:ty) -> $oresp:ty;)* }) => {
        #[tonic::async_trait]
        impl<E: KvEngine> Kv for KvService<E> {
            $(
                // Admits itself: it may wait (a long poll) before it does any work.
                async fn $own(&self, req: Request<$oreq>) -> Result<Response<$oresp>, Status> {
                    authorize(&self.auth, &req).await?;
                    self.storage.$own(req.into_inner()).await.map(Response::new)
                }
            )*
            $(
                async fn $method(&self, req: Request<$req>) -> Result<Response<$resp>, Status> {
                    authorize(&self.auth, &req).await?;
                    let Some(_permit) = self.storage.admit() else {
                        let mut busy = <$resp>::default();
                        busy.region_error = Some(atoll_raftstore::Error::ServerIsBusy("too many requests in flight".into()).into());
                        return Ok(Response::new(busy));
                    };
                    self.storage.$method(req.into_inner()).await.map(Response::new)
                }
            )*
        }
    };
}

kv_service! {
    admitted {
    kv_get(GetRequest) -> GetResponse;
    kv_batch_get(BatchGetRequest) -> BatchGetResponse;
    kv_scan(ScanRequest) -> ScanResponse;
    kv_put(PutRequest) -> PutResponse;
    kv_batch_put(BatchPutRequest) -> BatchPutResponse;
    kv_delete(DeleteRequest) -> DeleteResponse;
    kv_delete_range(DeleteRangeRequest) -> DeleteRangeResponse;
    kv_compare_and_swap(CompareAndSwapRequest) -> CompareAndSwapResponse;
    kv_prewrite(PrewriteRequest) -> PrewriteResponse;
    kv_commit(CommitRequest) -> CommitResponse;
    kv_batch_rollback(BatchRollbackRequest) -> BatchRollbackResponse;
    kv_check_txn_status(CheckTxnStatusRequest) -> CheckTxnStatusResponse;
    kv_check_secondary_locks(CheckSecondaryLocksRequest) -> CheckSecondaryLocksResponse;
    kv_resolve_lock(ResolveLockRequest) -> ResolveLockResponse;
    kv_txn_heart_beat(TxnHeartBeatRequest) -> TxnHeartBeatResponse;
    kv_pessimistic_lock(PessimisticLockRequest) -> PessimisticLockResponse;
    kv_pessimistic_rollback(PessimisticRollbackRequest) -> PessimisticRollbackResponse;
    kv_scan_lock(ScanLockRequest) -> ScanLockResponse;
    etcd_range(EtcdRangeRequest) -> EtcdRangeResponse;
    etcd_txn(EtcdTxnRequest) -> EtcdTxnResponse;
    gc_wait(GcWaitRequest) -> GcWaitResponse;
    split_region(SplitRegionRequest) -> SplitRegionResponse;
    lease_keep_alive(LeaseKeepAliveRequest) -> LeaseKeepAliveResponse;
    lease_time_to_live(LeaseTimeToLiveRequest) -> LeaseTimeToLiveResponse;
    }
    unadmitted {
        kv_changes(ChangesRequest) -> ChangesResponse;
    }
}
