//! The `Pd` gRPC service. Only the leader serves (followers answer `NOT_LEADER` with the
//! leader's address), except `GetMembers`, which any member answers.

use crate::cluster::{Cluster, PdError};
use atoll_proto::pdpb::pd_server::Pd;
use atoll_proto::pdpb::{self, ErrorType};
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub struct PdService {
    pub cluster: Arc<Cluster>,
    /// With TLS on: the store-only RPCs (bootstrap, ids, store registration, heartbeats,
    /// splits) need a cluster member's certificate.
    pub members_only: bool,
}

fn err_type(e: &PdError) -> ErrorType {
    match e {
        PdError::NotLeader => ErrorType::NotLeader,
        PdError::NotBootstrapped => ErrorType::NotBootstrapped,
        PdError::AlreadyBootstrapped => ErrorType::AlreadyBootstrapped,
        PdError::StoreTombstone(_) => ErrorType::StoreTombstone,
        PdError::StoreNotFound(_) => ErrorType::StoreNotFound,
        PdError::RegionNotFound => ErrorType::RegionNotFound,
        PdError::Invalid(_) => ErrorType::InvalidValue,
        PdError::ClusterMismatch(_) => ErrorType::ClusterMismatch,
        PdError::Other(_) => ErrorType::Unknown,
    }
}

impl PdService {
    fn ok_header(&self) -> Option<pdpb::ResponseHeader> {
        Some(pdpb::ResponseHeader {
            cluster_id: self.cluster.cluster_id(),
            error: None,
            leader: None,
        })
    }

    fn err_header(&self, e: &PdError) -> Option<pdpb::ResponseHeader> {
        Some(pdpb::ResponseHeader {
            cluster_id: self.cluster.cluster_id(),
            error: Some(pdpb::Error {
                r#type: err_type(e) as i32,
                message: e.to_string(),
            }),
            leader: if matches!(e, PdError::NotLeader) {
                self.cluster.leader_member()
            } else {
                None
            },
        })
    }

    fn header<T>(&self, r: &Result<T, PdError>) -> Option<pdpb::ResponseHeader> {
        match r {
            Ok(_) => self.ok_header(),
            Err(e) => self.err_header(e),
        }
    }

    /// Requests naming another cluster are refused.
    fn check_cluster(&self, h: &Option<pdpb::RequestHeader>) -> Result<(), PdError> {
        let want = h.as_ref().map_or(0, |h| h.cluster_id);
        let have = self.cluster.cluster_id();
        if want != 0 && have != 0 && want != have {
            return Err(PdError::ClusterMismatch(format!(
                "request for cluster {want}, this is cluster {have}"
            )));
        }
        Ok(())
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Pd for PdService {
    async fn get_members(
        &self,
        _req: Request<pdpb::GetMembersRequest>,
    ) -> Result<Response<pdpb::GetMembersResponse>, Status> {
        Ok(Response::new(pdpb::GetMembersResponse {
            header: self.ok_header(),
            members: self.cluster.members(),
            leader: self.cluster.leader_member(),
        }))
    }

    type TsoStream = BoxStream<pdpb::TsoResponse>;

    async fn tso(
        &self,
        req: Request<Streaming<pdpb::TsoRequest>>,
    ) -> Result<Response<Self::TsoStream>, Status> {
        let mut inbound = req.into_inner();
        let cluster = self.cluster.clone();
        let (tx, rx) = mpsc::channel(64);
        let svc = PdService {
            cluster: cluster.clone(),
            members_only: self.members_only,
        };
        tokio::spawn(async move {
            while let Some(Ok(r)) = inbound.next().await {
                let res: Result<(i64, i64), PdError> = match svc.check_cluster(&r.header) {
                    Err(e) => Err(e),
                    Ok(()) => match cluster.ensure_leader() {
                        Err(e) => Err(e),
                        Ok(()) => cluster.tso.alloc(r.count).await.map_err(PdError::from),
                    },
                };
                let resp = match res {
                    Ok((physical, logical)) => pdpb::TsoResponse {
                        header: svc.ok_header(),
                        count: r.count.max(1),
                        timestamp: Some(pdpb::Timestamp { physical, logical }),
                    },
                    Err(e) => pdpb::TsoResponse {
                        header: svc.err_header(&e),
                        count: 0,
                        timestamp: None,
                    },
                };
                if tx.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn bootstrap(
        &self,
        req: Request<pdpb::BootstrapRequest>,
    ) -> Result<Response<pdpb::BootstrapResponse>, Status> {
        atoll_util::tls::check_member(self.members_only, req.extensions())?;
        let r = req.into_inner();
        let res = match (r.store, r.region) {
            (Some(s), Some(g)) => self.cluster.bootstrap(s, g).await,
            _ => Err(PdError::Invalid(
                "bootstrap needs a store and a region".into(),
            )),
        };
        Ok(Response::new(pdpb::BootstrapResponse {
            header: self.header(&res),
        }))
    }

    async fn is_bootstrapped(
        &self,
        _req: Request<pdpb::IsBootstrappedRequest>,
    ) -> Result<Response<pdpb::IsBootstrappedResponse>, Status> {
        let res = self.cluster.ensure_leader();
        Ok(Response::new(pdpb::IsBootstrappedResponse {
            header: self.header(&res),
            bootstrapped: self.cluster.is_bootstrapped(),
        }))
    }

    async fn alloc_id(
        &self,
        req: Request<pdpb::AllocIdRequest>,
    ) -> Result<Response<pdpb::AllocIdResponse>, Status> {
        atoll_util::tls::check_member(self.members_only, req.extensions())?;
        let r = req.into_inner();
        let count = r.count.clamp(1, 100_000);
        let res = match self.cluster.ensure_leader() {
            Ok(()) => self.cluster.ids.alloc(count).await.map_err(PdError::from),
            Err(e) => Err(e),
        };
        Ok(Response::new(pdpb::AllocIdResponse {
            header: self.header(&res),
            id: *res.as_ref().unwrap_or(&0),
            count,
        }))
    }

    async fn put_store(
        &self,
        req: Request<pdpb::PutStoreRequest>,
    ) -> Result<Response<pdpb::PutStoreResponse>, Status> {
        atoll_util::tls::check_member(self.members_only, req.extensions())?;
        let r = req.into_inner();
        let res = match self.check_cluster(&r.header) {
            Ok(()) => match r.store {
                Some(s) => self.cluster.put_store(s).await,
                None => Err(PdError::Invalid("put store without a store".into())),
            },
            Err(e) => Err(e),
        };
        Ok(Response::new(pdpb::PutStoreResponse {
            header: self.header(&res),
        }))
    }

    async fn get_store(
        &self,
        req: Request<pdpb::GetStoreRequest>,
    ) -> Result<Response<pdpb::GetStoreResponse>, Status> {
        let r = req.into_inner();
        let res = self.cluster.get_store(r.store_id);
        let header = self.header(&res);
        let (store, stats) = match res {
            Ok((s, st)) => (Some(s), st),
            Err(_) => (None, None),
        };
        Ok(Response::new(pdpb::GetStoreResponse {
            header,
            store,
            stats,
        }))
    }

    async fn get_all_stores(
        &self,
        req: Request<pdpb::GetAllStoresRequest>,
    ) -> Result<Response<pdpb::GetAllStoresResponse>, Status> {
        let r = req.into_inner();
        let res = self.cluster.store_infos(r.exclude_tombstone_stores);
        let header = self.header(&res);
        let infos = res.unwrap_or_default();
        Ok(Response::new(pdpb::GetAllStoresResponse {
            header,
            stores: infos.iter().filter_map(|i| i.store.clone()).collect(),
            infos,
        }))
    }

    async fn store_heartbeat(
        &self,
        req: Request<pdpb::StoreHeartbeatRequest>,
    ) -> Result<Response<pdpb::StoreHeartbeatResponse>, Status> {
        atoll_util::tls::check_member(self.members_only, req.extensions())?;
        let r = req.into_inner();
        let res = match (self.check_cluster(&r.header), r.stats) {
            (Err(e), _) => Err(e),
            (Ok(()), Some(s)) => self.cluster.store_heartbeat(s),
            (Ok(()), None) => Err(PdError::Invalid("store heartbeat without stats".into())),
        };
        let header = self.header(&res);
        let mut resp = res.unwrap_or_default();
        resp.header = header;
        Ok(Response::new(resp))
    }

    type RegionHeartbeatStream = BoxStream<pdpb::RegionHeartbeatResponse>;

    async fn region_heartbeat(
        &self,
        req: Request<Streaming<pdpb::RegionHeartbeatRequest>>,
    ) -> Result<Response<Self::RegionHeartbeatStream>, Status> {
        atoll_util::tls::check_member(self.members_only, req.extensions())?;
        let mut inbound = req.into_inner();
        let cluster = self.cluster.clone();
        let (tx, rx) = mpsc::channel(1024);
        let svc = PdService {
            cluster: cluster.clone(),
            members_only: self.members_only,
        };
        tokio::spawn(async move {
            let mut registered = 0u64;
            while let Some(Ok(r)) = inbound.next().await {
                let store_id = r.leader.as_ref().map_or(0, |l| l.store_id);
                if store_id != 0 && store_id != registered {
                    cluster.register_stream(store_id, tx.clone());
                    registered = store_id;
                }
                let res = svc
                    .check_cluster(&r.header)
                    .and_then(|()| cluster.region_heartbeat(r));
                match res {
                    Ok(Some(mut resp)) => {
                        resp.header = svc.ok_header();
                        if tx.send(Ok(resp)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(e @ PdError::NotLeader) => {
                        // Tell the store where the leader is, then end the stream.
                        let resp = pdpb::RegionHeartbeatResponse {
                            header: svc.err_header(&e),
                            ..Default::default()
                        };
                        let _ = tx.send(Ok(resp)).await;
                        break;
                    }
                    Err(e) => tracing::debug!(error = %e, "region heartbeat refused"),
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_region(
        &self,
        req: Request<pdpb::GetRegionRequest>,
    ) -> Result<Response<pdpb::GetRegionResponse>, Status> {
        let r = req.into_inner();
        let res = self.cluster.get_region(&r.region_key);
        Ok(Response::new(region_response(self.header(&res), res.ok())))
    }

    async fn get_prev_region(
        &self,
        req: Request<pdpb::GetRegionRequest>,
    ) -> Result<Response<pdpb::GetRegionResponse>, Status> {
        let r = req.into_inner();
        let res = self.cluster.get_prev_region(&r.region_key);
        Ok(Response::new(region_response(self.header(&res), res.ok())))
    }

    async fn get_region_by_id(
        &self,
        req: Request<pdpb::GetRegionByIdRequest>,
    ) -> Result<Response<pdpb::GetRegionResponse>, Status> {
        let r = req.into_inner();
        let res = self.cluster.get_region_by_id(r.region_id);
        Ok(Response::new(region_response(
            self.header(&res),
            res.ok().flatten(),
        )))
    }

    async fn scan_regions(
        &self,
        req: Request<pdpb::ScanRegionsRequest>,
    ) -> Result<Response<pdpb::ScanRegionsResponse>, Status> {
        let r = req.into_inner();
        let res = self
            .cluster
            .scan_regions(&r.start_key, &r.end_key, r.limit as usize);
        let header = self.header(&res);
        let regions = res
            .unwrap_or_default()
            .into_iter()
            .map(|rec| pdpb::RegionWithLeader {
                region: rec.region,
                leader: rec.leader,
            })
            .collect();
        Ok(Response::new(pdpb::ScanRegionsResponse { header, regions }))
    }

    async fn ask_batch_split(
        &self,
        req: Request<pdpb::AskBatchSplitRequest>,
    ) -> Result<Response<pdpb::AskBatchSplitResponse>, Status> {
        atoll_util::tls::check_member(self.members_only, req.extensions())?;
        let r = req.into_inner();
        let res = match r.region {
            Some(region) => self.cluster.ask_batch_split(region, r.split_count).await,
            None => Err(PdError::Invalid("ask split without a region".into())),
        };
        let header = self.header(&res);
        Ok(Response::new(pdpb::AskBatchSplitResponse {
            header,
            ids: res.unwrap_or_default(),
        }))
    }

    async fn report_batch_split(
        &self,
        req: Request<pdpb::ReportBatchSplitRequest>,
    ) -> Result<Response<pdpb::ReportBatchSplitResponse>, Status> {
        atoll_util::tls::check_member(self.members_only, req.extensions())?;
        let r = req.into_inner();
        let res = self.cluster.report_batch_split(r.regions);
        Ok(Response::new(pdpb::ReportBatchSplitResponse {
            header: self.header(&res),
        }))
    }

    async fn get_gc_safe_point(
        &self,
        _req: Request<pdpb::GetGcSafePointRequest>,
    ) -> Result<Response<pdpb::GetGcSafePointResponse>, Status> {
        let res = self.cluster.gc_safe_point();
        Ok(Response::new(pdpb::GetGcSafePointResponse {
            header: self.header(&res),
            safe_point: res.unwrap_or(0),
        }))
    }

    async fn update_gc_safe_point(
        &self,
        req: Request<pdpb::UpdateGcSafePointRequest>,
    ) -> Result<Response<pdpb::UpdateGcSafePointResponse>, Status> {
        let r = req.into_inner();
        let res = self.cluster.update_gc_safe_point(r.safe_point).await;
        Ok(Response::new(pdpb::UpdateGcSafePointResponse {
            header: self.header(&res),
            new_safe_point: res.unwrap_or(0),
        }))
    }

    async fn delete_store(
        &self,
        req: Request<pdpb::DeleteStoreRequest>,
    ) -> Result<Response<pdpb::DeleteStoreResponse>, Status> {
        let r = req.into_inner();
        let res = self.cluster.delete_store(r.store_id).await;
        Ok(Response::new(pdpb::DeleteStoreResponse {
            header: self.header(&res),
        }))
    }

    async fn get_operators(
        &self,
        _req: Request<pdpb::GetOperatorsRequest>,
    ) -> Result<Response<pdpb::GetOperatorsResponse>, Status> {
        let res = self.cluster.ensure_leader();
        let operators = if res.is_ok() {
            self.cluster.coord.lock().infos()
        } else {
            vec![]
        };
        Ok(Response::new(pdpb::GetOperatorsResponse {
            header: self.header(&res),
            operators,
        }))
    }
}

fn region_response(
    header: Option<pdpb::ResponseHeader>,
    rec: Option<pdpb::RegionRecord>,
) -> pdpb::GetRegionResponse {
    match rec {
        Some(r) => pdpb::GetRegionResponse {
            header,
            region: r.region,
            leader: r.leader,
        },
        None => pdpb::GetRegionResponse {
            header,
            region: None,
            leader: None,
        },
    }
}
