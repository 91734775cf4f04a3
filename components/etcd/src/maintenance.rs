//! etcd's Maintenance service.
//!
//! | call | what this store answers |
//! | --- | --- |
//! | Status | `version` [`ETCD_VERSION`](crate::ETCD_VERSION); `dbSize` the bytes of the RocksDB directory, `dbSizeInUse` those of the live SST files and write-ahead logs; `leader` the store leading the first region (the one holding the empty key), as this store knows it if it hosts a peer of that region, else as PD knows it, 0 with the error `etcdserver: no leader` if neither knows; `raftIndex`, `raftAppliedIndex`, `raftTerm` the largest committed index, applied index and term among this store's regions; `isLearner` false |
//! | Alarm | no alarms, whatever the action (Atoll raises none; ACTIVATE and DEACTIVATE change nothing) |
//! | Defragment | compacts every data column family of this store's RocksDB over its whole range, answered when done; calls queue behind a running one; a caller that gives up does not stop it |
//! | Hash, HashKV, Snapshot, MoveLeader, Downgrade | `Unimplemented`, saying why |

use crate::auth::Need;
use crate::context::EtcdContext;
use crate::errors;
use crate::header::make_header;
use atoll_proto::etcdserverpb::maintenance_server::Maintenance;
use atoll_proto::etcdserverpb::{
    AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse, DowngradeRequest,
    DowngradeResponse, HashKvRequest, HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest,
    MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

/// Serializes defragmentations of a store; the guard lives as long as the compaction itself.
#[derive(Default)]
pub(crate) struct DefragState {
    lock: Arc<tokio::sync::Mutex<()>>,
}

pub struct MaintenanceService {
    ctx: Arc<EtcdContext>,
}

impl MaintenanceService {
    pub fn new(ctx: Arc<EtcdContext>) -> Self {
        MaintenanceService { ctx }
    }

    /// The store id of the first region's leader, 0 if unknown.
    async fn leader(&self) -> u64 {
        if let Some(id) = self.ctx.local.leader_for_key(b"") {
            return id;
        }
        match self.ctx.pd.get_region(b"").await {
            Ok(info) => info.leader.map_or(0, |p| p.store_id),
            Err(e) => {
                tracing::debug!(error = %e, "no leader for etcd Status: PD");
                0
            }
        }
    }
}

fn join_error(e: tokio::task::JoinError) -> Status {
    errors::atoll(Code::Internal, format!("local task failed: {e}"))
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        // etcd: any user may list the alarms, only root change them.
        let get = request.get_ref().action
            == atoll_proto::etcdserverpb::alarm_request::AlarmAction::Get as i32;
        let need = if get { Need::User } else { Need::Admin };
        self.ctx.auth.authorize(&request, &[need]).await?;
        let revision = self.ctx.current_revision().await;
        Ok(Response::new(AlarmResponse {
            header: Some(self.ctx.header(revision)),
            alarms: vec![],
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let local = self.ctx.local.clone();
        let (raft, db) =
            tokio::task::spawn_blocking(move || (local.raft_status(), local.db_size()))
                .await
                .map_err(join_error)?;
        let (leader, revision) = tokio::join!(self.leader(), self.ctx.current_revision());
        let term = self.ctx.refresh_raft_term(raft.term);
        let mut errs = vec![];
        if leader == 0 {
            errs.push(errors::no_leader().message().to_string());
        }
        Ok(Response::new(StatusResponse {
            header: Some(make_header(
                self.ctx.cluster_id(),
                self.ctx.store_id,
                revision,
                term,
            )),
            version: crate::ETCD_VERSION.into(),
            db_size: db.physical as i64,
            leader,
            raft_index: raft.commit_index,
            raft_term: term,
            raft_applied_index: raft.applied_index,
            errors: errs,
            db_size_in_use: db.in_use as i64,
            is_learner: false,
            ..Default::default()
        }))
    }

    async fn defragment(
        &self,
        request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        self.ctx.auth.authorize(&request, &[Need::Admin]).await?;
        let guard = self.ctx.defrag.lock.clone().lock_owned().await;
        let local = self.ctx.local.clone();
        let store_id = self.ctx.store_id;
        tracing::info!(
            store_id,
            "starting defragment (compacting the data column families)"
        );
        let started = Instant::now();
        let r = tokio::task::spawn_blocking(move || {
            let _running = guard;
            local.compact_data()
        })
        .await
        .map_err(join_error)?;
        match r {
            Ok(()) => {
                tracing::info!(store_id, took = ?started.elapsed(), "finished defragment");
                // etcd answers a defragment with no header.
                Ok(Response::new(DefragmentResponse { header: None }))
            }
            Err(e) => {
                tracing::warn!(store_id, error = %e, "failed to defragment");
                Err(Status::unknown(e))
            }
        }
    }

    async fn hash(&self, request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.ctx.auth.authorize(&request, &[Need::Admin]).await?;
        Err(errors::unimplemented(
            "Hash is not supported: data is spread over many raft groups whose replicas raft keeps identical; there is no single backend to hash",
        ))
    }

    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        self.ctx.auth.authorize(&request, &[Need::Admin]).await?;
        Err(errors::unimplemented(
            "HashKV is not supported: data is spread over many raft groups whose replicas raft keeps identical; there is no single backend to hash",
        ))
    }

    type SnapshotStream =
        Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send + 'static>>;

    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        self.ctx.auth.authorize(&request, &[Need::Admin]).await?;
        Err(errors::unimplemented(
            "Snapshot is not supported: a store holds only some regions of the key space, so no one member can stream a backup of it",
        ))
    }

    async fn move_leader(
        &self,
        request: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        self.ctx.auth.authorize(&request, &[Need::Admin]).await?;
        Err(errors::unimplemented(
            "MoveLeader is not supported: every region elects its own leader and PD balances leaders across stores",
        ))
    }

    async fn downgrade(
        &self,
        request: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        self.ctx.auth.authorize(&request, &[Need::Admin]).await?;
        Err(errors::unimplemented(
            "Downgrade is not supported: stores of different Atoll versions are upgraded and downgraded by restarting them",
        ))
    }
}
