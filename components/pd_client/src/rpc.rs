//! `RpcPdClient`: the gRPC PD client. It knows several PD addresses, finds the leader from any
//! live one, follows `NOT_LEADER` redirections, and retries retryable failures with backoff
//! inside a deadline. The region heartbeat stream and the TSO stream reconnect by themselves.

use crate::tso::TsoBatcher;
use crate::{Error, HeartbeatResponseHandler, PdClient, RegionInfo, Result};
use async_trait::async_trait;
use atoll_proto::pdpb::pd_client::PdClient as GrpcPd;
use atoll_proto::{metapb, pdpb};
use atoll_util::backoff::Backoff;
use atoll_util::tls::ClientTls;
use parking_lot::{Mutex, RwLock};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::Channel;

#[derive(Clone, Debug)]
pub struct RpcPdConfig {
    pub endpoints: Vec<String>,
    /// One RPC's timeout.
    pub rpc_timeout: Duration,
    /// How long a call keeps retrying (leader changes, unreachable members).
    pub retry_deadline: Duration,
    /// TLS to PD (`None`: plaintext).
    pub tls: Option<ClientTls>,
}

impl RpcPdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        RpcPdConfig {
            endpoints,
            rpc_timeout: Duration::from_secs(3),
            retry_deadline: Duration::from_secs(15),
            tls: None,
        }
    }
}

/// Splits `a,b,c` and strips schemes.
pub fn parse_endpoints(s: &str) -> Vec<String> {
    s.split(',')
        .map(|e| {
            e.trim()
                .trim_start_matches("http://")
                .trim_start_matches("https://")
                .to_string()
        })
        .filter(|e| !e.is_empty())
        .collect()
}

pub(crate) trait HasHeader {
    fn header(&self) -> Option<&pdpb::ResponseHeader>;
}

macro_rules! has_header {
    ($($t:ty),*) => {$(
        impl HasHeader for $t {
            fn header(&self) -> Option<&pdpb::ResponseHeader> {
                self.header.as_ref()
            }
        }
    )*};
}

has_header!(
    pdpb::GetMembersResponse,
    pdpb::TsoResponse,
    pdpb::BootstrapResponse,
    pdpb::IsBootstrappedResponse,
    pdpb::AllocIdResponse,
    pdpb::PutStoreResponse,
    pdpb::GetStoreResponse,
    pdpb::GetAllStoresResponse,
    pdpb::StoreHeartbeatResponse,
    pdpb::RegionHeartbeatResponse,
    pdpb::GetRegionResponse,
    pdpb::ScanRegionsResponse,
    pdpb::AskBatchSplitResponse,
    pdpb::ReportBatchSplitResponse,
    pdpb::GetGcSafePointResponse,
    pdpb::UpdateGcSafePointResponse,
    pdpb::DeleteStoreResponse,
    pdpb::GetOperatorsResponse
);

/// Maps a response header's error.
pub(crate) fn check_header(
    h: Option<&pdpb::ResponseHeader>,
) -> std::result::Result<(), (Error, Option<String>)> {
    let Some(h) = h else { return Ok(()) };
    let Some(e) = &h.error else { return Ok(()) };
    use pdpb::ErrorType as T;
    let err = match T::try_from(e.r#type).unwrap_or(T::Unknown) {
        T::Ok => return Ok(()),
        T::NotLeader => {
            let leader = h
                .leader
                .as_ref()
                .map(|m| m.client_addr.clone())
                .filter(|a| !a.is_empty());
            return Err((
                Error::Other(format!("not leader: {}", e.message)),
                leader.or(Some(String::new())),
            ));
        }
        T::NotBootstrapped => Error::NotBootstrapped,
        T::AlreadyBootstrapped => Error::AlreadyBootstrapped,
        T::StoreTombstone => Error::StoreTombstone(0),
        T::StoreNotFound => Error::StoreNotFound(0),
        T::RegionNotFound => Error::RegionNotFound,
        T::ClusterMismatch => Error::ClusterMismatch(e.message.clone()),
        T::InvalidValue => Error::InvalidValue(e.message.clone()),
        T::StaleRegion => Error::InvalidValue(format!("stale region: {}", e.message)),
        T::Unknown => Error::Other(e.message.clone()),
    };
    Err((err, None))
}

struct Leader {
    addr: String,
    client: GrpcPd<Channel>,
}

struct Inner {
    cfg: RpcPdConfig,
    cluster_id: AtomicU64,
    leader: RwLock<Option<Arc<Leader>>>,
    hb_handler: RwLock<Option<Arc<HeartbeatResponseHandler>>>,
    hb_tx: Mutex<Option<(String, mpsc::Sender<pdpb::RegionHeartbeatRequest>)>>,
    tso: TsoBatcher,
}

#[derive(Clone)]
pub struct RpcPdClient {
    inner: Arc<Inner>,
}

pub(crate) async fn connect(
    addr: &str,
    timeout: Duration,
    tls: Option<&ClientTls>,
) -> Result<Channel> {
    let ep = atoll_util::tls::endpoint(addr, tls)
        .map_err(|e| Error::InvalidValue(format!("bad PD address {addr:?}: {e}")))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(3));
    atoll_util::tls::connect(ep, tls)
        .await
        .map_err(|e| Error::Unreachable {
            addrs: addr.to_string(),
            reason: e.to_string(),
        })
}

impl RpcPdClient {
    /// Connects to the PD cluster behind `cfg.endpoints` (finds its leader).
    pub async fn connect(cfg: RpcPdConfig) -> Result<Self> {
        if cfg.endpoints.is_empty() {
            return Err(Error::InvalidValue("no PD endpoints given".into()));
        }
        let inner = Arc::new(Inner {
            cfg,
            cluster_id: AtomicU64::new(0),
            leader: RwLock::new(None),
            hb_handler: RwLock::new(None),
            hb_tx: Mutex::new(None),
            tso: TsoBatcher::new(),
        });
        let c = RpcPdClient { inner };
        let deadline = Instant::now() + c.inner.cfg.retry_deadline;
        c.find_leader(deadline).await?;
        c.inner.tso.start(c.clone());
        Ok(c)
    }

    pub fn endpoints(&self) -> &[String] {
        &self.inner.cfg.endpoints
    }

    pub fn leader_addr(&self) -> Option<String> {
        self.inner.leader.read().as_ref().map(|l| l.addr.clone())
    }

    /// Asks every known member who leads; connects to it.
    async fn find_leader(&self, deadline: Instant) -> Result<Arc<Leader>> {
        let mut backoff = Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(500),
            deadline,
        );
        let mut last_err = String::from("no member answered");
        loop {
            let mut candidates: Vec<String> = self.inner.cfg.endpoints.clone();
            if let Some(l) = self.inner.leader.read().as_ref() {
                candidates.retain(|c| *c != l.addr);
                candidates.insert(0, l.addr.clone());
            }
            for addr in candidates {
                let timeout = self
                    .inner
                    .cfg
                    .rpc_timeout
                    .min(deadline.saturating_duration_since(Instant::now()))
                    .max(Duration::from_millis(100));
                let ch = match connect(&addr, timeout, self.inner.cfg.tls.as_ref()).await {
                    Ok(ch) => ch,
                    Err(e) => {
                        last_err = e.to_string();
                        continue;
                    }
                };
                let mut client = GrpcPd::new(ch);
                let resp = match tokio::time::timeout(
                    timeout,
                    client.get_members(pdpb::GetMembersRequest { header: None }),
                )
                .await
                {
                    Ok(Ok(r)) => r.into_inner(),
                    Ok(Err(s)) => {
                        last_err = format!("{addr}: {}", s.message());
                        continue;
                    }
                    Err(_) => {
                        last_err = format!("{addr}: timed out");
                        continue;
                    }
                };
                // A new PD leader persists the cluster id right after its election: until
                // then it answers with none, and a client that connected then would carry
                // no id in its headers (nor report one) until it reconnected.
                let id = resp.header.as_ref().map_or(0, |h| h.cluster_id);
                if id == 0 {
                    last_err = format!("{addr}: cluster id not assigned yet");
                    continue;
                }
                let known = self.inner.cluster_id.load(Ordering::Relaxed);
                if known != 0 && known != id {
                    return Err(Error::ClusterMismatch(format!(
                        "{addr} belongs to cluster {id}, not {known}"
                    )));
                }
                self.inner.cluster_id.store(id, Ordering::Relaxed);
                let Some(leader) = resp.leader.filter(|l| !l.client_addr.is_empty()) else {
                    last_err = format!("{addr}: no leader elected yet");
                    continue;
                };
                let leader_client = if leader.client_addr == addr {
                    client
                } else {
                    match connect(&leader.client_addr, timeout, self.inner.cfg.tls.as_ref()).await {
                        Ok(ch) => GrpcPd::new(ch),
                        Err(e) => {
                            last_err = e.to_string();
                            continue;
                        }
                    }
                };
                let l = Arc::new(Leader {
                    addr: leader.client_addr.clone(),
                    client: leader_client,
                });
                *self.inner.leader.write() = Some(l.clone());
                return Ok(l);
            }
            if !backoff.wait().await {
                return Err(Error::Unreachable {
                    addrs: self.inner.cfg.endpoints.join(","),
                    reason: last_err,
                });
            }
        }
    }

    async fn leader(&self, deadline: Instant) -> Result<Arc<Leader>> {
        if let Some(l) = self.inner.leader.read().clone() {
            return Ok(l);
        }
        self.find_leader(deadline).await
    }

    fn invalidate(&self, addr: &str) {
        let mut l = self.inner.leader.write();
        if l.as_ref().is_some_and(|x| x.addr == addr) {
            *l = None;
        }
    }

    pub(crate) fn header(&self) -> Option<pdpb::RequestHeader> {
        Some(pdpb::RequestHeader {
            cluster_id: self.inner.cluster_id.load(Ordering::Relaxed),
        })
    }

    /// Runs `f` against the leader, following redirections and retrying until the deadline.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: HasHeader,
        F: Fn(GrpcPd<Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + self.inner.cfg.retry_deadline;
        let mut backoff = Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(500),
            deadline,
        );
        loop {
            let leader = self.leader(deadline).await?;
            let timeout = self.inner.cfg.rpc_timeout;
            let err = match tokio::time::timeout(timeout, f(leader.client.clone())).await {
                Ok(Ok(resp)) => {
                    let resp = resp.into_inner();
                    match check_header(resp.header()) {
                        Ok(()) => return Ok(resp),
                        Err((e, Some(new_leader))) => {
                            self.invalidate(&leader.addr);
                            if !new_leader.is_empty() {
                                // Prefer the hinted leader next time.
                                if let Ok(ch) =
                                    connect(&new_leader, timeout, self.inner.cfg.tls.as_ref()).await
                                {
                                    *self.inner.leader.write() = Some(Arc::new(Leader {
                                        addr: new_leader,
                                        client: GrpcPd::new(ch),
                                    }));
                                    continue;
                                }
                            }
                            e
                        }
                        Err((e, None)) => return Err(e),
                    }
                }
                Ok(Err(status)) => {
                    self.invalidate(&leader.addr);
                    Error::Unreachable {
                        addrs: leader.addr.clone(),
                        reason: status.message().to_string(),
                    }
                }
                Err(_) => {
                    self.invalidate(&leader.addr);
                    Error::Timeout(timeout)
                }
            };
            if !backoff.wait().await {
                return Err(err);
            }
        }
    }

    pub(crate) async fn tso_stream(&self) -> Result<(String, GrpcPd<Channel>)> {
        let deadline = Instant::now() + self.inner.cfg.retry_deadline;
        let l = self.leader(deadline).await?;
        Ok((l.addr.clone(), l.client.clone()))
    }

    pub(crate) fn on_stream_error(&self, addr: &str) {
        self.invalidate(addr);
    }

    fn dispatch_heartbeat_response(&self, resp: pdpb::RegionHeartbeatResponse) {
        if let Some(h) = self.inner.hb_handler.read().clone() {
            h(resp);
        }
    }

    async fn heartbeat_sender(&self) -> Result<mpsc::Sender<pdpb::RegionHeartbeatRequest>> {
        let deadline = Instant::now() + self.inner.cfg.retry_deadline;
        let leader = self.leader(deadline).await?;
        if let Some((addr, tx)) = self.inner.hb_tx.lock().as_ref() {
            if *addr == leader.addr && !tx.is_closed() {
                return Ok(tx.clone());
            }
        }
        let (tx, rx) = mpsc::channel::<pdpb::RegionHeartbeatRequest>(4096);
        let mut client = leader.client.clone();
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let this = self.clone();
        let addr = leader.addr.clone();
        let resp = client
            .region_heartbeat(stream)
            .await
            .map_err(|s| Error::Unreachable {
                addrs: addr.clone(),
                reason: s.message().to_string(),
            })?;
        let mut inbound = resp.into_inner();
        let a2 = addr.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(r)) => {
                        if let Err((_, Some(_))) = check_header(r.header.as_ref()) {
                            this.invalidate(&a2);
                            break;
                        }
                        this.dispatch_heartbeat_response(r)
                    }
                    Ok(None) | Err(_) => {
                        this.invalidate(&a2);
                        break;
                    }
                }
            }
            this.inner.hb_tx.lock().take();
        });
        *self.inner.hb_tx.lock() = Some((addr, tx.clone()));
        Ok(tx)
    }
}

#[async_trait]
impl PdClient for RpcPdClient {
    fn cluster_id(&self) -> u64 {
        self.inner.cluster_id.load(Ordering::Relaxed)
    }

    async fn is_cluster_bootstrapped(&self) -> Result<bool> {
        let h = self.header();
        let r = self
            .call(|mut c| async move {
                c.is_bootstrapped(pdpb::IsBootstrappedRequest { header: h })
                    .await
            })
            .await?;
        Ok(r.bootstrapped)
    }

    async fn bootstrap_cluster(&self, store: metapb::Store, region: metapb::Region) -> Result<()> {
        let h = self.header();
        self.call(|mut c| {
            let req = pdpb::BootstrapRequest {
                header: h,
                store: Some(store.clone()),
                region: Some(region.clone()),
            };
            async move { c.bootstrap(req).await }
        })
        .await?;
        Ok(())
    }

    async fn alloc_ids(&self, count: u32) -> Result<u64> {
        let h = self.header();
        let r = self
            .call(
                |mut c| async move { c.alloc_id(pdpb::AllocIdRequest { header: h, count }).await },
            )
            .await?;
        Ok(r.id)
    }

    async fn put_store(&self, store: metapb::Store) -> Result<()> {
        let h = self.header();
        self.call(|mut c| {
            let req = pdpb::PutStoreRequest {
                header: h,
                store: Some(store.clone()),
            };
            async move { c.put_store(req).await }
        })
        .await?;
        Ok(())
    }

    async fn get_store(&self, store_id: u64) -> Result<metapb::Store> {
        let h = self.header();
        let r = self
            .call(|mut c| async move {
                c.get_store(pdpb::GetStoreRequest {
                    header: h,
                    store_id,
                })
                .await
            })
            .await
            .map_err(|e| match e {
                Error::StoreNotFound(_) => Error::StoreNotFound(store_id),
                Error::StoreTombstone(_) => Error::StoreTombstone(store_id),
                e => e,
            })?;
        r.store.ok_or(Error::StoreNotFound(store_id))
    }

    async fn get_all_stores(&self, exclude_tombstone: bool) -> Result<Vec<pdpb::StoreInfo>> {
        let h = self.header();
        let r = self
            .call(|mut c| async move {
                c.get_all_stores(pdpb::GetAllStoresRequest {
                    header: h,
                    exclude_tombstone_stores: exclude_tombstone,
                })
                .await
            })
            .await?;
        Ok(r.infos)
    }

    async fn store_heartbeat(
        &self,
        stats: pdpb::StoreStats,
    ) -> Result<pdpb::StoreHeartbeatResponse> {
        let h = self.header();
        let store_id = stats.store_id;
        self.call(|mut c| {
            let req = pdpb::StoreHeartbeatRequest {
                header: h,
                stats: Some(stats),
            };
            async move { c.store_heartbeat(req).await }
        })
        .await
        .map_err(|e| match e {
            Error::StoreTombstone(_) => Error::StoreTombstone(store_id),
            e => e,
        })
    }

    async fn delete_store(&self, store_id: u64) -> Result<()> {
        let h = self.header();
        self.call(|mut c| async move {
            c.delete_store(pdpb::DeleteStoreRequest {
                header: h,
                store_id,
            })
            .await
        })
        .await
        .map_err(|e| match e {
            Error::StoreNotFound(_) => Error::StoreNotFound(store_id),
            Error::StoreTombstone(_) => Error::StoreTombstone(store_id),
            e => e,
        })?;
        Ok(())
    }

    async fn region_heartbeat(&self, mut req: pdpb::RegionHeartbeatRequest) -> Result<()> {
        req.header = self.header();
        for _ in 0..2 {
            let tx = self.heartbeat_sender().await?;
            match tx.try_send(req) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return Err(Error::Other("region heartbeat queue full".into()))
                }
                Err(mpsc::error::TrySendError::Closed(r)) => {
                    self.inner.hb_tx.lock().take();
                    req = r;
                }
            }
        }
        Err(Error::Other("region heartbeat stream closed".into()))
    }

    fn set_heartbeat_handler(&self, handler: HeartbeatResponseHandler) {
        *self.inner.hb_handler.write() = Some(Arc::new(handler));
    }

    async fn get_region(&self, key: &[u8]) -> Result<RegionInfo> {
        let h = self.header();
        let r = self
            .call(|mut c| {
                let req = pdpb::GetRegionRequest {
                    header: h,
                    region_key: key.to_vec(),
                };
                async move { c.get_region(req).await }
            })
            .await?;
        let region = r.region.ok_or(Error::RegionNotFound)?;
        Ok(RegionInfo {
            region,
            leader: r.leader.filter(|p| p.id != 0),
        })
    }

    async fn get_prev_region(&self, key: &[u8]) -> Result<RegionInfo> {
        let h = self.header();
        let r = self
            .call(|mut c| {
                let req = pdpb::GetRegionRequest {
                    header: h,
                    region_key: key.to_vec(),
                };
                async move { c.get_prev_region(req).await }
            })
            .await?;
        let region = r.region.ok_or(Error::RegionNotFound)?;
        Ok(RegionInfo {
            region,
            leader: r.leader.filter(|p| p.id != 0),
        })
    }

    async fn get_region_by_id(&self, region_id: u64) -> Result<Option<RegionInfo>> {
        let h = self.header();
        let r = self
            .call(|mut c| async move {
                c.get_region_by_id(pdpb::GetRegionByIdRequest {
                    header: h,
                    region_id,
                })
                .await
            })
            .await;
        match r {
            Ok(r) => Ok(r.region.map(|region| RegionInfo {
                region,
                leader: r.leader.filter(|p| p.id != 0),
            })),
            Err(Error::RegionNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn scan_regions(&self, start: &[u8], end: &[u8], limit: u32) -> Result<Vec<RegionInfo>> {
        let h = self.header();
        let r = self
            .call(|mut c| {
                let req = pdpb::ScanRegionsRequest {
                    header: h,
                    start_key: start.to_vec(),
                    end_key: end.to_vec(),
                    limit,
                };
                async move { c.scan_regions(req).await }
            })
            .await?;
        Ok(r.regions
            .into_iter()
            .filter_map(|x| {
                x.region.map(|region| RegionInfo {
                    region,
                    leader: x.leader.filter(|p| p.id != 0),
                })
            })
            .collect())
    }

    async fn ask_batch_split(
        &self,
        region: metapb::Region,
        count: u32,
    ) -> Result<Vec<pdpb::SplitId>> {
        let h = self.header();
        let r = self
            .call(|mut c| {
                let req = pdpb::AskBatchSplitRequest {
                    header: h,
                    region: Some(region.clone()),
                    split_count: count,
                };
                async move { c.ask_batch_split(req).await }
            })
            .await?;
        Ok(r.ids)
    }

    async fn report_batch_split(&self, regions: Vec<metapb::Region>) -> Result<()> {
        let h = self.header();
        self.call(|mut c| {
            let req = pdpb::ReportBatchSplitRequest {
                header: h,
                regions: regions.clone(),
            };
            async move { c.report_batch_split(req).await }
        })
        .await?;
        Ok(())
    }

    async fn get_tso_block(&self, count: u32) -> Result<u64> {
        self.inner
            .tso
            .get(count, self.inner.cfg.retry_deadline)
            .await
    }

    fn tso_high_water(&self) -> u64 {
        self.inner.tso.high_water()
    }

    async fn get_gc_safe_point(&self) -> Result<u64> {
        let h = self.header();
        let r = self
            .call(|mut c| async move {
                c.get_gc_safe_point(pdpb::GetGcSafePointRequest { header: h })
                    .await
            })
            .await?;
        Ok(r.safe_point)
    }

    async fn update_gc_safe_point(&self, safe_point: u64) -> Result<u64> {
        let h = self.header();
        let r = self
            .call(|mut c| async move {
                c.update_gc_safe_point(pdpb::UpdateGcSafePointRequest {
                    header: h,
                    safe_point,
                })
                .await
            })
            .await?;
        Ok(r.new_safe_point)
    }

    async fn get_members(&self) -> Result<pdpb::GetMembersResponse> {
        // Members are answered by followers too: ask around if the leader is gone.
        let deadline = Instant::now() + self.inner.cfg.retry_deadline;
        let h = self.header();
        match self
            .call(|mut c| async move { c.get_members(pdpb::GetMembersRequest { header: h }).await })
            .await
        {
            Ok(r) => Ok(r),
            Err(e) => {
                for addr in &self.inner.cfg.endpoints {
                    if Instant::now() >= deadline {
                        break;
                    }
                    if let Ok(ch) = connect(
                        addr,
                        self.inner.cfg.rpc_timeout,
                        self.inner.cfg.tls.as_ref(),
                    )
                    .await
                    {
                        if let Ok(r) = GrpcPd::new(ch)
                            .get_members(pdpb::GetMembersRequest { header: None })
                            .await
                        {
                            return Ok(r.into_inner());
                        }
                    }
                }
                Err(e)
            }
        }
    }

    async fn get_operators(&self) -> Result<Vec<pdpb::OperatorInfo>> {
        let h = self.header();
        let r = self
            .call(|mut c| async move {
                c.get_operators(pdpb::GetOperatorsRequest { header: h })
                    .await
            })
            .await?;
        Ok(r.operators)
    }
}
