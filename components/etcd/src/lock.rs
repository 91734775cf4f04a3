//! etcd's Lock service (`v3lockpb.Lock`), as etcd's server serves it over its client's
//! `concurrency.Mutex`, built here on the same recipes as the Election service
//! ([`crate::election::Recipes`]): Lock(name, lease) is a Campaign with an empty value, and
//! Unlock(key) deletes the key.
//!
//! - **The key** is `NAME/<lease in hex>` (etcd's layout; `etcdctl lock` and etcd's client
//!   recipes queue on the same keys). A lease that already holds or waits for the lock
//!   re-enters with its existing key.
//! - **The answer's `header.revision`** is a revision at which the caller held the lock: the
//!   revision of the txn that created the key when it was the oldest at once, otherwise that
//!   of the read that found every older key gone and the caller's key still there (etcd's
//!   `Mutex.Header()`). It is larger than every revision at which an earlier holder held the
//!   lock, so it serves as a fencing token (`etcdctl lock` passes it to its command as
//!   `ETCD_LOCK_REV`, `kvctl lock` as `ATOLL_LOCK_REV`). The key's `create_revision` orders
//!   holders too and is what a txn compares to act only while the lock is held
//!   (`create_revision(key) == R`).
//! - A Lock whose client goes away while waiting deletes its key (etcd's `Mutex.Lock` unlocks
//!   on a cancelled context); one whose key vanished while it waited (its lease expired)
//!   fails with `mutex: session is expired`.
//! - Errors are answered as etcd's server answers them: `Unknown` with etcd's message
//!   ([`as_etcd_answers`]).

use crate::election::{as_etcd_answers, Recipes};
use atoll_proto::etcdserverpb::kv_server::Kv;
use atoll_proto::etcdserverpb::DeleteRangeRequest;
use atoll_proto::v3lockpb::lock_server::Lock;
use atoll_proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The Lock service.
pub struct LockService {
    recipes: Arc<Recipes>,
    auth: Arc<crate::auth::AuthStore>,
}

impl LockService {
    pub fn new(recipes: Arc<Recipes>, auth: Arc<crate::auth::AuthStore>) -> Self {
        LockService { recipes, auth }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let needs = crate::election::name_needs(&req.get_ref().name);
        self.auth
            .authorize(&req, &needs)
            .await
            .map_err(as_etcd_answers)?;
        self.do_lock(req.into_inner())
            .await
            .map(Response::new)
            .map_err(as_etcd_answers)
    }

    async fn unlock(
        &self,
        req: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let needs = vec![crate::auth::Need::write(&req.get_ref().key, b"")];
        self.auth
            .authorize(&req, &needs)
            .await
            .map_err(as_etcd_answers)?;
        self.do_unlock(req.into_inner())
            .await
            .map(Response::new)
            .map_err(as_etcd_answers)
    }
}

impl LockService {
    async fn do_lock(&self, r: LockRequest) -> Result<LockResponse, Status> {
        let lease = self.recipes.session_lease(r.lease).await?;
        let (c, header) = self.recipes.acquire(&r.name, lease, vec![], false).await?;
        Ok(LockResponse {
            header: Some(header),
            key: c.key,
        })
    }

    async fn do_unlock(&self, r: UnlockRequest) -> Result<UnlockResponse, Status> {
        let d = DeleteRangeRequest {
            key: r.key,
            ..Default::default()
        };
        let resp = Kv::delete_range(self.recipes.kv.as_ref(), crate::auth::internal(d))
            .await?
            .into_inner();
        Ok(UnlockResponse {
            header: resp.header,
        })
    }
}
