//! The receiving side: the `Raft` gRPC service.

use crate::{failpoint_names_store, failpoint_value, RaftSink, FP_RECV_DROP};
use atoll_proto::raft_serverpb::raft_server::Raft;
use atoll_proto::raft_serverpb::{BatchRaftMessage, Done, SnapshotChunk, SnapshotMeta};
use atoll_raftstore::snap::{verify_file, SnapKey};
use protobuf::Message as _;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};

pub struct RaftService {
    sink: Arc<dyn RaftSink>,
    recv_sem: Arc<Semaphore>,
}

impl RaftService {
    pub fn new(sink: Arc<dyn RaftSink>, recv_limit: usize) -> Self {
        RaftService {
            sink,
            recv_sem: Arc::new(Semaphore::new(recv_limit.max(1))),
        }
    }
}

#[tonic::async_trait]
impl Raft for RaftService {
    async fn raft(
        &self,
        req: Request<Streaming<BatchRaftMessage>>,
    ) -> Result<Response<Done>, Status> {
        let mut s = req.into_inner();
        while let Some(batch) = s.message().await? {
            if let Some(v) = failpoint_value(FP_RECV_DROP) {
                if failpoint_names_store(v.as_deref(), batch.from_store_id) {
                    continue;
                }
            }
            self.sink.on_store_heard(batch.from_store_id);
            for m in batch.msgs {
                self.sink.send_raft_message(m);
            }
        }
        Ok(Response::new(Done {}))
    }

    async fn snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<Done>, Status> {
        let _permit = self
            .recv_sem
            .acquire()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mgr = self.sink.snap_mgr().clone();
        let _guard = mgr.receiving();
        let mut s = req.into_inner();
        let first = s
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let msg = first
            .message
            .ok_or_else(|| Status::invalid_argument("first chunk carries no message"))?;
        let from_store = msg.from_peer.as_ref().map_or(0, |p| p.store_id);
        if let Some(v) = failpoint_value(FP_RECV_DROP) {
            if failpoint_names_store(v.as_deref(), from_store) {
                return Err(Status::unavailable("dropped by failpoint"));
            }
        }
        let m = raft::eraftpb::Message::parse_from_bytes(&msg.message)
            .map_err(|e| Status::invalid_argument(format!("bad raft message: {e}")))?;
        let meta: SnapshotMeta = prost::Message::decode(m.get_snapshot().get_data())
            .map_err(|e| Status::invalid_argument(format!("bad snapshot meta: {e}")))?;
        let key = SnapKey::from_meta(&meta);
        let path = mgr.recv_path(&key);
        let tmp = path.with_extension("snap.tmp");
        let io = |e: std::io::Error| Status::internal(format!("write {tmp:?}: {e}"));
        let mut f = tokio::fs::File::create(&tmp).await.map_err(io)?;
        let mut written = 0u64;
        while let Some(chunk) = s.message().await? {
            written += chunk.data.len() as u64;
            if written > meta.data_size.max(1) * 2 + (1 << 20) {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(Status::invalid_argument("snapshot larger than announced"));
            }
            f.write_all(&chunk.data).await.map_err(io)?;
        }
        f.sync_all().await.map_err(io)?;
        drop(f);
        let t2 = tmp.clone();
        let verified = tokio::task::spawn_blocking(move || verify_file(&t2))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        if let Err(e) = verified {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(Status::data_loss(e.to_string()));
        }
        tokio::fs::rename(&tmp, &path).await.map_err(io)?;
        self.sink.on_snapshot_received();
        self.sink.send_raft_message(msg);
        Ok(Response::new(Done {}))
    }
}
