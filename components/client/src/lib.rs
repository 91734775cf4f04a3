//! The Atoll client: routes every request by key through a cached region map, repairs the
//! cache from typed region errors, and retries with backoff and jitter inside a deadline.
//!
//! | module | owns |
//! | --- | --- |
//! | this file | [`Client`]: connections, the request loop, plain reads and writes, scans |
//! | [`region_cache`] | regions by start key, leaders, store addresses |
//! | [`lock_resolver`] | what a reader does when it meets another transaction's lock |
//! | [`txn`] | optimistic/pessimistic transactions (Percolator, two-phase or one-phase) |
//! | [`etcd`] | the region-level calls of the etcd API: ranges with etcd's metadata, one-region txns |
//! | [`errors`] | errors a caller can act on |
//!
//! Data model (docs/design/transactions.md): everything is multi-version. Plain writes commit
//! in one phase on the key's region leader; a retry of a write whose answer was lost is
//! recognised by its unique start timestamp and not applied twice. Plain `get` reads the
//! latest committed value (linearizable); `scan` reads one snapshot at a fresh timestamp, so
//! it never shows part of a transaction, even across regions.

pub mod errors;
pub mod etcd;
pub mod lock_resolver;
pub mod region_cache;
pub mod txn;

pub use errors::{Error, Result};
pub use txn::{Transaction, TxnOptions};

use atoll_pd_client::{PdClient, RpcPdClient, RpcPdConfig};
use atoll_proto::kvrpcpb::kv_client::KvClient;
use atoll_proto::{errorpb, kvrpcpb, metapb};
use atoll_util::backoff::Backoff;
use atoll_util::tls::ClientTls;
use parking_lot::{Mutex, RwLock};
use region_cache::{CachedRegion, RegionCache};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub pd_endpoints: Vec<String>,
    /// A whole request (with its retries) must finish within this.
    pub timeout: Duration,
    /// One RPC attempt.
    pub rpc_timeout: Duration,
    pub max_key_size: usize,
    pub max_value_size: usize,
    /// Scan page size per region request.
    pub scan_batch: u32,
    /// TEST ONLY, deliberately unsafe: plain `get`s go to a random peer, which answers from
    /// whatever it has applied, without ReadIndex (stale reads). Needs stores started with
    /// `--allow-unsafe-local-read`. Exists so that the chaos suite can show its checker
    /// catches a broken read path.
    pub unsafe_follower_read: bool,
    /// HTTP/2 connections per store (requests are spread over them in turn).
    pub connections_per_store: usize,
    /// TLS for PD and the stores (CA, and a client certificate for mutual TLS); `None`:
    /// plaintext.
    pub tls: Option<ClientTls>,
}

impl ClientConfig {
    pub fn new(pd_endpoints: Vec<String>) -> Self {
        ClientConfig {
            pd_endpoints,
            timeout: Duration::from_secs(20),
            rpc_timeout: Duration::from_secs(5),
            max_key_size: atoll_keys::DEFAULT_MAX_KEY_SIZE,
            max_value_size: atoll_keys::DEFAULT_MAX_VALUE_SIZE,
            scan_batch: 1024,
            unsafe_follower_read: false,
            connections_per_store: 1,
            tls: None,
        }
    }
}

/// Responses that may carry a region error.
pub trait RegionResponse {
    fn take_region_error(&mut self) -> Option<errorpb::Error>;
}

macro_rules! region_response {
    ($($t:ty),*) => {$(
        impl RegionResponse for $t {
            fn take_region_error(&mut self) -> Option<errorpb::Error> {
                self.region_error.take()
            }
        }
    )*};
}

region_response!(
    kvrpcpb::GetResponse,
    kvrpcpb::BatchGetResponse,
    kvrpcpb::ScanResponse,
    kvrpcpb::PutResponse,
    kvrpcpb::BatchPutResponse,
    kvrpcpb::DeleteResponse,
    kvrpcpb::DeleteRangeResponse,
    kvrpcpb::CompareAndSwapResponse,
    kvrpcpb::PrewriteResponse,
    kvrpcpb::CommitResponse,
    kvrpcpb::BatchRollbackResponse,
    kvrpcpb::CheckTxnStatusResponse,
    kvrpcpb::CheckSecondaryLocksResponse,
    kvrpcpb::ResolveLockResponse,
    kvrpcpb::TxnHeartBeatResponse,
    kvrpcpb::PessimisticLockResponse,
    kvrpcpb::PessimisticRollbackResponse,
    kvrpcpb::ScanLockResponse,
    kvrpcpb::EtcdRangeResponse,
    kvrpcpb::EtcdTxnResponse,
    kvrpcpb::ChangesResponse,
    kvrpcpb::SplitRegionResponse,
    kvrpcpb::LeaseKeepAliveResponse,
    kvrpcpb::LeaseTimeToLiveResponse
);

/// A pool of unique timestamps for plain writes' start timestamps (prefetched in blocks:
/// they identify a write, they need not be fresh).
struct TsPool {
    next: u64,
    end: u64,
}

/// How a client reaches a store's KV service: an HTTP/2 channel, or the service itself in
/// this process ([`Client::serve_locally`]).
pub type KvTransport = tower::util::BoxCloneSyncService<
    tonic::codegen::http::Request<tonic::body::Body>,
    tonic::codegen::http::Response<tonic::body::Body>,
    TransportError,
>;

/// Marks a request as made by a store's own client in the same process (set by
/// [`Client::serve_locally`]'s transport, in the request's extensions, which no network client
/// can set): the store's KV service knows the etcd layer checked the user already.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InProcess;

/// A token to send with every request (gRPC metadata `token`, etcd's key), or none. Asked
/// for each request, so it can be renewed.
pub type TokenSource = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// A transport failure (the channel's error; an in-process service has none).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct TransportError(#[from] tonic::transport::Error);

/// A KV client over either transport.
pub type KvConn = KvClient<KvTransport>;

pub struct Client {
    cfg: ClientConfig,
    pub(crate) cache: RegionCache,
    /// `connections_per_store` HTTP/2 connections per store address, used in turn.
    conns: RwLock<HashMap<String, Vec<KvConn>>>,
    /// A store in this process, called directly (address, client).
    local: RwLock<Option<(String, KvConn)>>,
    next_conn: std::sync::atomic::AtomicUsize,
    /// TLS of new store connections ([`ClientConfig::tls`], or [`Client::set_tls`]).
    tls: RwLock<Option<ClientTls>>,
    pool: tokio::sync::Mutex<TsPool>,
    stats: Mutex<ClientStats>,
    /// The token requests over the network carry (none: no `token` metadata).
    token: Arc<RwLock<Option<TokenSource>>>,
}

#[derive(Clone, Debug, Default)]
pub struct ClientStats {
    pub region_errors: u64,
    pub rpc_errors: u64,
    pub retries: u64,
}

pub(crate) enum Locate<'a> {
    Key(&'a [u8]),
    /// The region just before this end key (reverse scans).
    Before(&'a [u8]),
}

/// A key-value pair (value empty when keys only).
pub type KvPair = (Vec<u8>, Vec<u8>);

impl Client {
    pub async fn connect(cfg: ClientConfig) -> Result<Arc<Client>> {
        let mut pd_cfg = RpcPdConfig::new(cfg.pd_endpoints.clone());
        pd_cfg.retry_deadline = cfg.timeout;
        pd_cfg.rpc_timeout = cfg.rpc_timeout.min(Duration::from_secs(3));
        pd_cfg.tls = cfg.tls.clone();
        let pd = RpcPdClient::connect(pd_cfg).await?;
        Ok(Self::with_pd(cfg, Arc::new(pd)))
    }

    pub fn with_pd(cfg: ClientConfig, pd: Arc<dyn PdClient>) -> Arc<Client> {
        Arc::new(Client {
            tls: RwLock::new(cfg.tls.clone()),
            cfg,
            cache: RegionCache::new(pd),
            conns: RwLock::new(HashMap::new()),
            local: RwLock::new(None),
            next_conn: std::sync::atomic::AtomicUsize::new(0),
            pool: tokio::sync::Mutex::new(TsPool { next: 0, end: 0 }),
            stats: Mutex::new(ClientStats::default()),
            token: Arc::new(RwLock::new(None)),
        })
    }

    /// Sends `source`'s token (gRPC metadata `token`) with every request to a store over the
    /// network from now on: a user's token from etcd's `Authenticate`, or a store's own
    /// token for its calls to other stores. Requests served in process carry
    /// [`InProcess`] instead.
    pub fn set_token_source(&self, source: Option<TokenSource>) {
        *self.token.write() = source;
    }

    /// Sends `token` with every request over the network (see [`Client::set_token_source`]).
    pub fn set_token(&self, token: Option<String>) {
        self.set_token_source(token.map(|t| Arc::new(move || Some(t.clone())) as TokenSource));
    }

    pub fn pd(&self) -> &Arc<dyn PdClient> {
        self.cache.pd()
    }

    /// Store connections made from now on use `tls` (a store's own client, whose config it
    /// does not make, dials the other stores with the store's certificate).
    pub fn set_tls(&self, tls: Option<ClientTls>) {
        *self.tls.write() = tls;
        self.conns.write().clear();
    }

    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    pub fn stats(&self) -> ClientStats {
        self.stats.lock().clone()
    }

    pub fn region_cache(&self) -> &RegionCache {
        &self.cache
    }

    /// A fresh timestamp from PD.
    pub async fn tso(&self) -> Result<u64> {
        Ok(self.pd().get_tso().await?)
    }

    /// A unique (not necessarily fresh) timestamp identifying one write; the next one is
    /// reserved for its commit (see `start_version` in kvrpcpb), so they go out in pairs.
    pub(crate) async fn unique_ts(&self) -> Result<u64> {
        let mut p = self.pool.lock().await;
        if p.next + 1 >= p.end {
            let first = self.pd().get_tso_block(256).await?;
            p.next = first;
            p.end = first + 256;
        }
        let ts = p.next;
        p.next += 2;
        Ok(ts)
    }

    /// Requests for the store at `addr` go to `service`, in this process, instead of over the
    /// network: a storage node's own client (the etcd layer's) calls its own store directly,
    /// with no HTTP/2 framing and no socket. Everything else is unchanged: the same request and
    /// response messages, region errors and retries.
    pub fn serve_locally<S>(&self, addr: &str, service: S)
    where
        S: tower::Service<
                tonic::codegen::http::Request<tonic::body::Body>,
                Response = tonic::codegen::http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let service = tower::ServiceExt::map_request(
            service,
            |mut r: tonic::codegen::http::Request<tonic::body::Body>| {
                r.extensions_mut().insert(InProcess);
                r
            },
        );
        let service = tower::ServiceExt::map_err(service, |e| -> TransportError { match e {} });
        let c = KvClient::new(KvTransport::new(service))
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20);
        *self.local.write() = Some((addr.to_string(), c));
    }

    fn conn(&self, addr: &str) -> Result<KvConn> {
        if let Some((a, c)) = &*self.local.read() {
            if a == addr {
                return Ok(c.clone());
            }
        }
        let i = self
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(cs) = self.conns.read().get(addr) {
            return Ok(cs[i % cs.len()].clone());
        }
        let n = self.cfg.connections_per_store.max(1);
        let mut cs = Vec::with_capacity(n);
        let tls = self.tls.read().clone();
        for _ in 0..n {
            let ep = atoll_util::tls::endpoint(addr, tls.as_ref())
                .map_err(|e| Error::InvalidArgument(format!("bad store address {addr:?}: {e}")))?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .initial_stream_window_size(4 << 20)
                .initial_connection_window_size(16 << 20);
            let ch = atoll_util::tls::connect_lazy(ep, tls.as_ref());
            let token = self.token.clone();
            let ch = tower::ServiceExt::map_request(
                ch,
                move |mut r: tonic::codegen::http::Request<tonic::body::Body>| {
                    let source = token.read().clone();
                    if let Some(t) = source.and_then(|s| s()) {
                        if let Ok(v) = tonic::codegen::http::HeaderValue::from_str(&t) {
                            r.headers_mut().insert("token", v);
                        }
                    }
                    r
                },
            );
            let ch = tower::ServiceExt::map_err(ch, TransportError);
            cs.push(
                KvClient::new(KvTransport::new(ch))
                    .max_decoding_message_size(256 << 20)
                    .max_encoding_message_size(256 << 20),
            );
        }
        let c = cs[i % n].clone();
        self.conns.write().entry(addr.to_string()).or_insert(cs);
        Ok(c)
    }

    fn drop_conn(&self, addr: &str) {
        self.conns.write().remove(addr);
    }

    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.cfg.timeout
    }

    pub(crate) fn backoff(&self, deadline: Instant) -> Backoff {
        Backoff::new(
            Duration::from_millis(5),
            Duration::from_millis(500),
            deadline,
        )
    }

    /// Sends a request to the region for `locate`, retrying region errors and transport
    /// failures until `deadline`. `f` builds and sends the request from a connection, the
    /// context and the region. Only idempotent requests may be retried after a transport
    /// failure: every request this client sends is (writes carry a unique start timestamp).
    pub(crate) async fn call<Resp, Fut, F>(
        &self,
        locate: Locate<'_>,
        deadline: Instant,
        f: F,
    ) -> Result<(CachedRegion, Resp)>
    where
        Resp: RegionResponse,
        F: Fn(KvConn, kvrpcpb::Context, CachedRegion) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let mut backoff = self.backoff(deadline);
        let mut last = String::from("no attempt");
        loop {
            if Instant::now() >= deadline {
                return Err(Error::Timeout(self.cfg.timeout, last));
            }
            let region = match &locate {
                Locate::Key(k) => self.cache.locate(k).await,
                Locate::Before(k) => self.cache.locate_before(k).await,
            };
            let region = match region {
                Ok(r) => r,
                Err(e) => {
                    last = e.to_string();
                    if !backoff.wait().await {
                        return Err(Error::Timeout(self.cfg.timeout, last));
                    }
                    continue;
                }
            };
            let Some(peer) = region.target() else {
                self.cache.invalidate(region.region.id);
                last = format!("region {} has no peers", region.region.id);
                backoff.wait().await;
                continue;
            };
            let addr = match self.cache.store_addr(peer.store_id).await {
                Ok(a) => a,
                Err(e) => {
                    last = e.to_string();
                    self.cache.switch_peer(region.region.id, &peer);
                    backoff.wait().await;
                    continue;
                }
            };
            let client = self.conn(&addr)?;
            let ctx = kvrpcpb::Context {
                region_id: region.region.id,
                region_epoch: region.region.region_epoch,
                peer: Some(peer),
                ..Default::default()
            };
            let left = deadline
                .saturating_duration_since(Instant::now())
                .min(self.cfg.rpc_timeout);
            match tokio::time::timeout(left, f(client, ctx, region.clone())).await {
                Ok(Ok(resp)) => {
                    let mut resp = resp.into_inner();
                    match resp.take_region_error() {
                        None => return Ok((region, resp)),
                        Some(e) => {
                            self.stats.lock().region_errors += 1;
                            if let Some(t) = &e.raft_entry_too_large {
                                return Err(Error::InvalidArgument(format!(
                                    "request too large for one raft entry ({} bytes)",
                                    t.entry_size
                                )));
                            }
                            last = errors::describe_region_error(&e);
                            let at_once = self.cache.on_region_error(&region, &e);
                            let hint = e.server_is_busy.as_ref().map_or(0, |b| b.backoff_ms);
                            self.stats.lock().retries += 1;
                            if !at_once && !backoff.wait_at_least(Duration::from_millis(hint)).await
                            {
                                return Err(Error::Timeout(self.cfg.timeout, last));
                            }
                        }
                    }
                }
                Ok(Err(status)) => {
                    self.stats.lock().rpc_errors += 1;
                    last = format!("store {} ({addr}): {}", peer.store_id, status.message());
                    if status.code() == tonic::Code::InvalidArgument {
                        return Err(Error::InvalidArgument(status.message().to_string()));
                    }
                    if matches!(
                        status.code(),
                        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                    ) {
                        return Err(Error::Auth(status.code(), status.message().to_string()));
                    }
                    self.drop_conn(&addr);
                    self.cache.invalidate_store(peer.store_id);
                    self.cache.switch_peer(region.region.id, &peer);
                    if !backoff.wait().await {
                        return Err(Error::Timeout(self.cfg.timeout, last));
                    }
                }
                Err(_) => {
                    self.stats.lock().rpc_errors += 1;
                    last = format!(
                        "store {} ({addr}) did not answer within {left:?}",
                        peer.store_id
                    );
                    self.cache.switch_peer(region.region.id, &peer);
                    if !backoff.wait().await {
                        return Err(Error::Timeout(self.cfg.timeout, last));
                    }
                }
            }
        }
    }

    // ---------------- validation ----------------

    /// A key of the user key space within the size limit (the system key space,
    /// `atoll_keys::SYSTEM_PREFIX` and up, holds Atoll's own records: no API writes it).
    pub(crate) fn check_key(&self, key: &[u8]) -> Result<()> {
        if atoll_keys::is_system_key(key) {
            return Err(Error::InvalidArgument(format!(
                "key {} is in the reserved key space (from {} up)",
                atoll_util::hex::display(key),
                atoll_util::hex::display(atoll_keys::SYSTEM_PREFIX)
            )));
        }
        self.check_key_size(key)
    }

    /// A key within the size limit, user or system.
    pub(crate) fn check_key_size(&self, key: &[u8]) -> Result<()> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("key must not be empty".into()));
        }
        if key.len() > self.cfg.max_key_size {
            return Err(Error::InvalidArgument(format!(
                "key of {} bytes exceeds the limit of {} bytes",
                key.len(),
                self.cfg.max_key_size
            )));
        }
        Ok(())
    }

    pub(crate) fn check_value(&self, value: &[u8]) -> Result<()> {
        if value.len() > self.cfg.max_value_size {
            return Err(Error::InvalidArgument(format!(
                "value of {} bytes exceeds the limit of {} bytes",
                value.len(),
                self.cfg.max_value_size
            )));
        }
        Ok(())
    }

    fn check_range(start: &[u8], end: &[u8]) -> Result<()> {
        if !end.is_empty() && start > end {
            return Err(Error::InvalidArgument(format!(
                "range start {} is after its end {}",
                atoll_util::hex::display(start),
                atoll_util::hex::display(end)
            )));
        }
        Ok(())
    }

    // ---------------- plain reads ----------------

    /// The latest committed value of `key` (linearizable).
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.check_key(key)?;
        if self.cfg.unsafe_follower_read {
            if let Some(v) = self.get_unsafe_local(key).await {
                return Ok(v);
            }
        }
        let deadline = self.deadline();
        // First at "latest"; if a transaction's lock is in the way, read at a fresh timestamp
        // so that locks can be pushed or resolved instead of waited for.
        let mut version = 0u64;
        let mut bypass: Vec<u64> = vec![];
        let mut backoff = self.backoff(deadline);
        loop {
            let (_, resp) = self
                .call(Locate::Key(key), deadline, |mut c, mut ctx, _| {
                    ctx.resolved_locks = bypass.clone();
                    let req = kvrpcpb::GetRequest {
                        context: Some(ctx),
                        key: key.to_vec(),
                        version,
                    };
                    async move { c.kv_get(req).await }
                })
                .await?;
            match resp.error {
                None => {
                    return Ok(if resp.not_found {
                        None
                    } else {
                        Some(resp.value)
                    })
                }
                Some(e) => match e.locked {
                    Some(lock) => {
                        if version == 0 {
                            version = self.tso().await?;
                        }
                        lock_resolver::resolve_and_wait(
                            self,
                            lock,
                            version,
                            deadline,
                            &mut bypass,
                            &mut backoff,
                            "key stayed locked",
                        )
                        .await?;
                    }
                    None => return Err(errors::key_error(e)),
                },
            }
        }
    }

    /// The deliberately broken read path of [`ClientConfig::unsafe_follower_read`]: one
    /// attempt on a random peer; `None` (use the safe path) on any error.
    async fn get_unsafe_local(&self, key: &[u8]) -> Option<Option<Vec<u8>>> {
        let region = self.cache.locate(key).await.ok()?;
        let peers = &region.region.peers;
        if peers.is_empty() {
            return None;
        }
        let peer = peers[rand::random::<usize>() % peers.len()];
        let addr = self.cache.store_addr(peer.store_id).await.ok()?;
        let mut c = self.conn(&addr).ok()?;
        let req = kvrpcpb::GetRequest {
            context: Some(kvrpcpb::Context {
                region_id: region.region.id,
                region_epoch: region.region.region_epoch,
                peer: Some(peer),
                unsafe_local_read: true,
                ..Default::default()
            }),
            key: key.to_vec(),
            version: 0,
        };
        let resp = tokio::time::timeout(self.cfg.rpc_timeout, c.kv_get(req))
            .await
            .ok()?
            .ok()?
            .into_inner();
        if resp.region_error.is_some() || resp.error.is_some() {
            return None;
        }
        Some(if resp.not_found {
            None
        } else {
            Some(resp.value)
        })
    }

    /// Reads `key` at snapshot `version` (resolving locks in the way).
    pub async fn get_at(&self, key: &[u8], version: u64) -> Result<Option<Vec<u8>>> {
        self.check_key(key)?;
        let deadline = self.deadline();
        let mut backoff = self.backoff(deadline);
        let mut bypass: Vec<u64> = vec![];
        loop {
            let (_, resp) = self
                .call(Locate::Key(key), deadline, |mut c, mut ctx, _| {
                    ctx.resolved_locks = bypass.clone();
                    let req = kvrpcpb::GetRequest {
                        context: Some(ctx),
                        key: key.to_vec(),
                        version,
                    };
                    async move { c.kv_get(req).await }
                })
                .await?;
            match resp.error {
                None => {
                    return Ok(if resp.not_found {
                        None
                    } else {
                        Some(resp.value)
                    })
                }
                Some(e) => {
                    lock_resolver::resolve_key_error(
                        self,
                        e,
                        version,
                        deadline,
                        &mut bypass,
                        &mut backoff,
                        "key stayed locked",
                    )
                    .await?;
                }
            }
        }
    }

    /// Values of `keys` that exist, read at one fresh snapshot, grouped by region.
    pub async fn batch_get(&self, keys: &[Vec<u8>]) -> Result<Vec<KvPair>> {
        for k in keys {
            self.check_key(k)?;
        }
        let version = self.tso().await?;
        self.batch_get_at(keys, version).await
    }

    pub async fn batch_get_at(&self, keys: &[Vec<u8>], version: u64) -> Result<Vec<KvPair>> {
        let mut out = vec![];
        let mut futs = vec![];
        for group in self.group_by_region(keys).await? {
            futs.push(async move {
                let mut got = vec![];
                for k in group {
                    if let Some(v) = self.get_at(&k, version).await? {
                        got.push((k, v));
                    }
                }
                Ok::<_, Error>(got)
            });
        }
        for r in futures::future::join_all(futs).await {
            out.extend(r?);
        }
        out.sort();
        Ok(out)
    }

    /// Groups keys by the region currently holding them (cache-assisted).
    pub(crate) async fn group_by_region(&self, keys: &[Vec<u8>]) -> Result<Vec<Vec<Vec<u8>>>> {
        let mut groups: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
        for k in keys {
            let r = self.cache.locate(k).await?;
            groups.entry(r.region.id).or_default().push(k.clone());
        }
        Ok(groups.into_values().collect())
    }

    /// Keys in `[start, end)` (empty end = no bound), at most `limit` (0 = all), read at one
    /// fresh snapshot across regions, in order (descending with `reverse`).
    pub async fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
        key_only: bool,
    ) -> Result<Vec<KvPair>> {
        Self::check_range(start, end)?;
        let version = self.tso().await?;
        self.scan_at(start, end, limit, reverse, key_only, version)
            .await
    }

    pub async fn scan_at(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
        key_only: bool,
        version: u64,
    ) -> Result<Vec<KvPair>> {
        Self::check_range(start, end)?;
        // The user key space only.
        let end: &[u8] = &atoll_keys::user_range_end(end);
        let deadline = self.deadline();
        let mut out: Vec<KvPair> = vec![];
        let mut backoff = self.backoff(deadline);
        let mut bypass: Vec<u64> = vec![];
        // Forward: `cursor` is the next start; reverse: the next (exclusive) end.
        let mut cursor: Vec<u8> = if reverse {
            end.to_vec()
        } else {
            start.to_vec()
        };
        loop {
            let want = if limit == 0 {
                self.cfg.scan_batch
            } else {
                ((limit - out.len()) as u32).min(self.cfg.scan_batch)
            };
            let locate = if reverse {
                Locate::Before(&cursor)
            } else {
                Locate::Key(&cursor)
            };
            let cur = cursor.clone();
            let (region, resp) = self
                .call(locate, deadline, |mut c, mut ctx, region| {
                    ctx.resolved_locks = bypass.clone();
                    let r = &region.region;
                    let (s, e) = if reverse {
                        let s = if start > r.start_key.as_slice() {
                            start.to_vec()
                        } else {
                            r.start_key.clone()
                        };
                        (s, cur.clone())
                    } else {
                        let e = etcd::clip_end(end, r);
                        (cur.clone(), e)
                    };
                    let req = kvrpcpb::ScanRequest {
                        context: Some(ctx),
                        start_key: s,
                        end_key: e,
                        limit: want,
                        key_only,
                        reverse,
                        version,
                    };
                    async move { c.kv_scan(req).await }
                })
                .await?;
            if let Some(e) = resp.error {
                lock_resolver::resolve_key_error(
                    self,
                    e,
                    version,
                    deadline,
                    &mut bypass,
                    &mut backoff,
                    "range stayed locked",
                )
                .await?;
                continue;
            }
            let n = resp.pairs.len();
            for p in resp.pairs {
                out.push((p.key, p.value));
            }
            if limit > 0 && out.len() >= limit {
                out.truncate(limit);
                return Ok(out);
            }
            if n as u32 >= want {
                // This region may hold more: continue after the last key.
                let last = out.last().map(|p| p.0.clone()).unwrap_or_default();
                if reverse {
                    cursor = last;
                } else {
                    cursor = last;
                    cursor.push(0);
                }
                continue;
            }
            let r = region.region;
            if reverse {
                if r.start_key.is_empty() || r.start_key.as_slice() <= start {
                    return Ok(out);
                }
                cursor = r.start_key;
            } else {
                if r.end_key.is_empty() || (!end.is_empty() && r.end_key.as_slice() >= end) {
                    return Ok(out);
                }
                cursor = r.end_key;
            }
        }
    }

    // ---------------- plain writes ----------------

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<u64> {
        self.check_key(key)?;
        self.check_value(value)?;
        self.write_one(key, Some(value)).await
    }

    pub async fn delete(&self, key: &[u8]) -> Result<u64> {
        self.check_key(key)?;
        self.write_one(key, None).await
    }

    /// One plain write, retried (with the same start timestamp, so never applied twice)
    /// through region errors and other transactions' locks. Returns the commit timestamp.
    async fn write_one(&self, key: &[u8], value: Option<&[u8]>) -> Result<u64> {
        let start_ts = self.unique_ts().await?;
        let deadline = self.deadline();
        let mut backoff = self.backoff(deadline);
        loop {
            let (err, commit) = match value {
                Some(v) => {
                    let (_, resp) = self
                        .call(Locate::Key(key), deadline, |mut c, ctx, _| {
                            let req = kvrpcpb::PutRequest {
                                context: Some(ctx),
                                key: key.to_vec(),
                                value: v.to_vec(),
                                start_version: start_ts,
                            };
                            async move { c.kv_put(req).await }
                        })
                        .await?;
                    (resp.error, resp.commit_version)
                }
                None => {
                    let (_, resp) = self
                        .call(Locate::Key(key), deadline, |mut c, ctx, _| {
                            let req = kvrpcpb::DeleteRequest {
                                context: Some(ctx),
                                key: key.to_vec(),
                                start_version: start_ts,
                            };
                            async move { c.kv_delete(req).await }
                        })
                        .await?;
                    (resp.error, resp.commit_version)
                }
            };
            match err {
                None => return Ok(commit),
                Some(e) => {
                    lock_resolver::resolve_write_key_error(self, e, deadline, &mut backoff).await?;
                }
            }
        }
    }

    /// Writes `pairs`, grouped by region; each region's part is atomic, the whole is not
    /// (use a transaction for that).
    pub async fn batch_put(&self, pairs: &[KvPair]) -> Result<()> {
        for (k, v) in pairs {
            self.check_key(k)?;
            self.check_value(v)?;
        }
        let keys: Vec<Vec<u8>> = pairs.iter().map(|p| p.0.clone()).collect();
        let values: HashMap<Vec<u8>, Vec<u8>> = pairs.iter().cloned().collect();
        let mut futs = vec![];
        for group in self.group_by_region(&keys).await? {
            let part: Vec<KvPair> = group
                .into_iter()
                .map(|k| {
                    let v = values[&k].clone();
                    (k, v)
                })
                .collect();
            futs.push(self.batch_put_region(part));
        }
        for r in futures::future::join_all(futs).await {
            r?;
        }
        Ok(())
    }

    async fn batch_put_region(&self, pairs: Vec<KvPair>) -> Result<()> {
        let start_ts = self.unique_ts().await?;
        let deadline = self.deadline();
        let mut pending = pairs;
        while !pending.is_empty() {
            let first = pending[0].0.clone();
            let (region, resp) = self
                .call(Locate::Key(&first), deadline, |mut c, ctx, region| {
                    // Only what this region holds goes in one request.
                    let mine: Vec<kvrpcpb::KvPair> = pending
                        .iter()
                        .filter(|(k, _)| region.contains(k))
                        .map(|(k, v)| kvrpcpb::KvPair {
                            key: k.clone(),
                            value: v.clone(),
                        })
                        .collect();
                    let req = kvrpcpb::BatchPutRequest {
                        context: Some(ctx),
                        pairs: mine,
                        start_version: start_ts,
                    };
                    async move { c.kv_batch_put(req).await }
                })
                .await?;
            if let Some(e) = resp.error {
                match e.locked {
                    Some(lock) => {
                        let wait =
                            lock_resolver::resolve(self, vec![lock], 0, deadline, &mut vec![])
                                .await?;
                        if wait > 0 {
                            tokio::time::sleep(Duration::from_millis(wait.min(200))).await;
                        }
                        continue;
                    }
                    None => return Err(errors::key_error(e)),
                }
            }
            pending.retain(|(k, _)| !region.contains(k));
        }
        Ok(())
    }

    /// Deletes every key in `[start, end)`, region by region, in bounded batches.
    pub async fn delete_range(&self, start: &[u8], end: &[u8]) -> Result<u64> {
        Self::check_range(start, end)?;
        // The user key space only.
        let end: &[u8] = &atoll_keys::user_range_end(end);
        if start >= end {
            return Ok(0);
        }
        let deadline = self.deadline();
        let mut cursor = start.to_vec();
        let mut deleted = 0u64;
        loop {
            let start_ts = self.unique_ts().await?;
            let cur = cursor.clone();
            let (region, resp) = self
                .call(Locate::Key(&cur), deadline, |mut c, ctx, region| {
                    let r = &region.region;
                    let e = etcd::clip_end(end, r);
                    let req = kvrpcpb::DeleteRangeRequest {
                        context: Some(ctx),
                        start_key: cur.clone(),
                        end_key: e,
                        limit: 0,
                        start_version: start_ts,
                    };
                    async move { c.kv_delete_range(req).await }
                })
                .await?;
            if let Some(e) = resp.error {
                match e.locked {
                    Some(lock) => {
                        let wait =
                            lock_resolver::resolve(self, vec![lock], 0, deadline, &mut vec![])
                                .await?;
                        if wait > 0 {
                            tokio::time::sleep(Duration::from_millis(wait.min(200))).await;
                        }
                        continue;
                    }
                    None => return Err(errors::key_error(e)),
                }
            }
            deleted += resp.deleted as u64;
            if resp.more {
                continue;
            }
            let r = region.region;
            if r.end_key.is_empty() || (!end.is_empty() && r.end_key.as_slice() >= end) {
                return Ok(deleted);
            }
            cursor = r.end_key;
        }
    }

    /// Sets `key` to `new` (None = delete) if its current value is `expected` (None = absent).
    /// Returns whether it swapped and the value it found.
    pub async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<(bool, Option<Vec<u8>>)> {
        self.check_key(key)?;
        if let Some(v) = new {
            self.check_value(v)?;
        }
        let start_ts = self.unique_ts().await?;
        let deadline = self.deadline();
        let mut backoff = self.backoff(deadline);
        loop {
            let (_, resp) = self
                .call(Locate::Key(key), deadline, |mut c, ctx, _| {
                    let req = kvrpcpb::CompareAndSwapRequest {
                        context: Some(ctx),
                        key: key.to_vec(),
                        expected: expected.map(|e| e.to_vec()).unwrap_or_default(),
                        expect_absent: expected.is_none(),
                        value: new.map(|v| v.to_vec()).unwrap_or_default(),
                        delete: new.is_none(),
                        start_version: start_ts,
                    };
                    async move { c.kv_compare_and_swap(req).await }
                })
                .await?;
            match resp.error {
                None => {
                    let prev = if resp.previous_not_found {
                        None
                    } else {
                        Some(resp.previous_value)
                    };
                    return Ok((resp.succeeded, prev));
                }
                Some(e) => {
                    lock_resolver::resolve_write_key_error(self, e, deadline, &mut backoff).await?;
                }
            }
        }
    }

    /// Waits until every store that is up has finished a GC pass at or above `safe_point`
    /// (already set in PD) over the regions it leads, each starting one at once if needed.
    /// Stores PD reports down are skipped: their peers' leaders are elsewhere. Returns the
    /// number of stores waited for.
    pub async fn wait_gc_done(&self, safe_point: u64, timeout: Duration) -> Result<usize> {
        let stores = self.pd().get_all_stores(true).await?;
        let up: Vec<_> = stores
            .into_iter()
            .filter(|s| !s.is_down)
            .filter_map(|s| s.store)
            .collect();
        let waits = up.iter().map(|s| async move {
            let mut c = self.conn(&s.address)?;
            let req = kvrpcpb::GcWaitRequest {
                safe_point,
                timeout_ms: timeout.as_millis() as u64,
            };
            let resp = tokio::time::timeout(timeout + Duration::from_secs(1), c.gc_wait(req))
                .await
                .map_err(|_| Error::Timeout(timeout, format!("GC on store {}", s.id)))?
                .map_err(|e| Error::Server(format!("store {}: {}", s.id, e.message())))?
                .into_inner();
            if let Some(e) = resp.region_error {
                return Err(Error::Server(format!("store {}: {}", s.id, e.message)));
            }
            if !resp.error.is_empty() {
                return Err(Error::Timeout(
                    timeout,
                    format!("store {}: {}", s.id, resp.error),
                ));
            }
            Ok(())
        });
        for r in futures::future::join_all(waits).await {
            r?;
        }
        Ok(up.len())
    }

    /// Splits the regions holding `keys` at them; returns the regions the splits produced.
    pub async fn split(&self, keys: &[Vec<u8>]) -> Result<Vec<metapb::Region>> {
        let mut sorted: Vec<Vec<u8>> = keys.to_vec();
        sorted.sort();
        sorted.dedup();
        for k in &sorted {
            self.check_key_size(k)?;
        }
        let deadline = self.deadline();
        let mut out = vec![];
        let mut i = 0;
        while i < sorted.len() {
            let region = self.cache.locate(&sorted[i]).await?;
            let batch: Vec<Vec<u8>> = sorted[i..]
                .iter()
                .take_while(|k| region.contains(k))
                .filter(|k| k.as_slice() != region.region.start_key.as_slice())
                .cloned()
                .collect();
            let taken = sorted[i..]
                .iter()
                .take_while(|k| region.contains(k))
                .count();
            if batch.is_empty() {
                i += taken.max(1);
                continue;
            }
            let first = batch[0].clone();
            let (_, resp) = self
                .call(Locate::Key(&first), deadline, |mut c, ctx, region| {
                    let mine: Vec<Vec<u8>> = batch
                        .iter()
                        .filter(|k| {
                            region.contains(k) && k.as_slice() != region.region.start_key.as_slice()
                        })
                        .cloned()
                        .collect();
                    let done = mine.is_empty();
                    let req = kvrpcpb::SplitRegionRequest {
                        context: Some(ctx),
                        split_keys: mine,
                    };
                    async move {
                        if done {
                            // A retry after an answer was lost: the split already happened
                            // (every key now starts a region). Nothing left to ask.
                            return Ok(tonic::Response::new(
                                kvrpcpb::SplitRegionResponse::default(),
                            ));
                        }
                        c.split_region(req).await
                    }
                })
                .await?;
            if !resp.error.is_empty() {
                return Err(Error::Server(resp.error));
            }
            for r in &resp.regions {
                self.cache.insert(CachedRegion {
                    region: r.clone(),
                    leader: None,
                });
            }
            if resp.regions.is_empty() {
                // The answer was lost and the retry found the split done: report the regions
                // that now start at the keys.
                for k in &batch {
                    let r = self.cache.locate(k).await?.region;
                    if !out.iter().any(|o: &metapb::Region| o.id == r.id) {
                        out.push(r);
                    }
                }
            } else {
                out.extend(resp.regions);
            }
            i += taken.max(1);
        }
        Ok(out)
    }
}
