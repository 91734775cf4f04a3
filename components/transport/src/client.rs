//! The sending side: per-store connections and snapshot streams.

use crate::{
    failpoint_names_store, failpoint_value, RaftSink, StoreResolver, FP_SEND_DELAY, FP_SEND_DROP,
};
use atoll_proto::raft_serverpb::raft_client::RaftClient;
use atoll_proto::raft_serverpb::{BatchRaftMessage, RaftMessage, SnapshotChunk, SnapshotMeta};
use atoll_raftstore::snap::SnapKey;
use atoll_raftstore::Transport;
use atoll_util::backoff::Backoff;
use atoll_util::tls::ClientTls;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify, Semaphore};
use tonic::transport::Channel;

#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Messages queued toward one store before new ones are dropped.
    pub queue_capacity: usize,
    /// An idle connection sends an empty batch this often (liveness).
    pub keepalive: Duration,
    pub connect_timeout: Duration,
    pub snap_chunk_size: usize,
    pub snap_send_limit: usize,
    /// TLS to the other stores: the store's peer certificate (`None`: plaintext).
    pub tls: Option<ClientTls>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            queue_capacity: 16 * 1024,
            keepalive: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            snap_chunk_size: 1 << 20,
            snap_send_limit: 4,
            tls: None,
        }
    }
}

struct Conn {
    queue: Mutex<Vec<RaftMessage>>,
    notify: Notify,
    closed: AtomicBool,
}

struct Inner {
    store_id: u64,
    cfg: TransportConfig,
    resolver: Arc<dyn StoreResolver>,
    runtime: tokio::runtime::Handle,
    sink: OnceLock<Arc<dyn RaftSink>>,
    conns: RwLock<HashMap<u64, Arc<Conn>>>,
    dirty: Mutex<Vec<u64>>,
    snap_sem: Arc<Semaphore>,
}

#[derive(Clone)]
pub struct GrpcTransport {
    inner: Arc<Inner>,
}

pub(crate) async fn connect(
    addr: &str,
    timeout: Duration,
    tls: Option<&ClientTls>,
) -> Result<Channel, String> {
    let ep = atoll_util::tls::endpoint(addr, tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(3))
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20);
    atoll_util::tls::connect(ep, tls)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))
}

impl GrpcTransport {
    pub fn new(
        store_id: u64,
        cfg: TransportConfig,
        resolver: Arc<dyn StoreResolver>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        let snap_sem = Arc::new(Semaphore::new(cfg.snap_send_limit.max(1)));
        GrpcTransport {
            inner: Arc::new(Inner {
                store_id,
                cfg,
                resolver,
                runtime,
                sink: OnceLock::new(),
                conns: RwLock::new(HashMap::new()),
                dirty: Mutex::new(vec![]),
                snap_sem,
            }),
        }
    }

    /// Connects the transport to the store it serves (once the store exists).
    pub fn set_sink(&self, sink: Arc<dyn RaftSink>) {
        let _ = self.inner.sink.set(sink);
    }

    fn conn(&self, store_id: u64) -> Arc<Conn> {
        if let Some(c) = self.inner.conns.read().get(&store_id) {
            return c.clone();
        }
        let mut conns = self.inner.conns.write();
        if let Some(c) = conns.get(&store_id) {
            return c.clone();
        }
        let c = Arc::new(Conn {
            queue: Mutex::new(vec![]),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
        });
        conns.insert(store_id, c.clone());
        let inner = self.inner.clone();
        let c2 = c.clone();
        self.inner
            .runtime
            .spawn(async move { run_conn(inner, store_id, c2).await });
        c
    }

    /// Stops every connection task.
    pub fn close(&self) {
        for (_, c) in self.inner.conns.write().drain() {
            c.closed.store(true, Ordering::SeqCst);
            c.notify.notify_one();
        }
    }
}

impl Transport for GrpcTransport {
    fn send(&self, msg: RaftMessage) -> bool {
        let to = msg.to_peer.as_ref().map_or(0, |p| p.store_id);
        if to == 0 || to == self.inner.store_id {
            return false;
        }
        if let Some(v) = failpoint_value(FP_SEND_DROP) {
            if failpoint_names_store(v.as_deref(), to) {
                return false;
            }
        }
        let conn = self.conn(to);
        let mut q = conn.queue.lock();
        if q.len() >= self.inner.cfg.queue_capacity {
            return false;
        }
        q.push(msg);
        if q.len() == 1 {
            drop(q);
            self.inner.dirty.lock().push(to);
        }
        true
    }

    fn send_snapshot(&self, msg: RaftMessage, meta: SnapshotMeta) -> bool {
        let Some(sink) = self.inner.sink.get().cloned() else {
            return false;
        };
        let to = msg.to_peer.as_ref().map_or(0, |p| p.store_id);
        if let Some(v) = failpoint_value(FP_SEND_DROP) {
            if failpoint_names_store(v.as_deref(), to) {
                return false;
            }
        }
        let inner = self.inner.clone();
        self.inner.runtime.spawn(async move {
            let region_id = msg.region_id;
            let to_peer = msg.to_peer.as_ref().map_or(0, |p| p.id);
            let ok = match send_snapshot(&inner, &sink, to, msg, meta).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(region_id, to_store = to, error = %e, "send snapshot");
                    false
                }
            };
            sink.report_snapshot_status(region_id, to_peer, ok);
        });
        true
    }

    fn flush(&self) {
        let dirty: Vec<u64> = std::mem::take(&mut *self.inner.dirty.lock());
        if dirty.is_empty() {
            return;
        }
        let conns = self.inner.conns.read();
        for id in dirty {
            if let Some(c) = conns.get(&id) {
                c.notify.notify_one();
            }
        }
    }
}

async fn run_conn(inner: Arc<Inner>, to: u64, conn: Arc<Conn>) {
    let mut backoff = Backoff::new(
        Duration::from_millis(50),
        Duration::from_secs(2),
        far_future(),
    );
    while !conn.closed.load(Ordering::SeqCst) {
        let addr = match inner.resolver.resolve(to).await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(to_store = to, error = %e, "resolve store");
                fail_pending(&inner, to, &conn);
                backoff.wait().await;
                continue;
            }
        };
        let ch = match connect(&addr, inner.cfg.connect_timeout, inner.cfg.tls.as_ref()).await {
            Ok(ch) => ch,
            Err(e) => {
                tracing::debug!(to_store = to, error = %e, "connect store");
                inner.resolver.invalidate(to);
                fail_pending(&inner, to, &conn);
                backoff.wait().await;
                continue;
            }
        };
        let (tx, rx) = mpsc::channel::<BatchRaftMessage>(64);
        let mut client = RaftClient::new(ch)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let mut call = tokio::spawn(async move {
            client
                .raft(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        let mut alive_since = None;
        loop {
            tokio::select! {
                _ = conn.notify.notified() => {}
                _ = tokio::time::sleep(inner.cfg.keepalive) => {}
                r = &mut call => {
                    tracing::debug!(to_store = to, result = ?r.map(|x| x.map(|_| ())), "raft stream ended");
                    break;
                }
            }
            if conn.closed.load(Ordering::SeqCst) {
                return;
            }
            let msgs = std::mem::take(&mut *conn.queue.lock());
            if let Some(v) = failpoint_value(FP_SEND_DROP) {
                // A partition drops keep-alives too.
                if failpoint_names_store(v.as_deref(), to) {
                    continue;
                }
            }
            if let Some(Some(ms)) = failpoint_value(FP_SEND_DELAY) {
                if let Ok(ms) = ms.trim().parse::<u64>() {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
            let batch = BatchRaftMessage {
                from_store_id: inner.store_id,
                msgs,
            };
            if tx.send(batch).await.is_err() {
                break;
            }
            if alive_since.is_none() {
                alive_since = Some(Instant::now());
            }
            if alive_since.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
                backoff = Backoff::new(
                    Duration::from_millis(50),
                    Duration::from_secs(2),
                    far_future(),
                );
            }
        }
        call.abort();
        inner.resolver.invalidate(to);
        fail_pending(&inner, to, &conn);
        backoff.wait().await;
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(10 * 365 * 24 * 3600)
}

/// The connection is down: drop what waits for it and let the regions know.
fn fail_pending(inner: &Inner, to: u64, conn: &Conn) {
    conn.queue.lock().clear();
    if let Some(sink) = inner.sink.get() {
        sink.report_unreachable(to);
    }
}

async fn send_snapshot(
    inner: &Inner,
    sink: &Arc<dyn RaftSink>,
    to: u64,
    msg: RaftMessage,
    meta: SnapshotMeta,
) -> Result<(), String> {
    let _permit = inner.snap_sem.acquire().await.map_err(|e| e.to_string())?;
    let _guard = sink.snap_mgr().sending();
    let key = SnapKey::from_meta(&meta);
    let path = sink.snap_mgr().gen_path(&key);
    if !path.exists() {
        return Err(format!("snapshot file {path:?} is gone"));
    }
    let addr = inner.resolver.resolve(to).await?;
    let ch = connect(&addr, inner.cfg.connect_timeout, inner.cfg.tls.as_ref()).await?;
    let mut client = RaftClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel::<SnapshotChunk>(4);
    let chunk_size = inner.cfg.snap_chunk_size.max(4096);
    let reader = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let mut f = std::fs::File::open(&path).map_err(|e| format!("open {path:?}: {e}"))?;
        tx.blocking_send(SnapshotChunk {
            message: Some(msg),
            data: vec![],
        })
        .map_err(|_| "stream closed".to_string())?;
        loop {
            let mut buf = vec![0u8; chunk_size];
            let n = f
                .read(&mut buf)
                .map_err(|e| format!("read {path:?}: {e}"))?;
            if n == 0 {
                return Ok(());
            }
            buf.truncate(n);
            tx.blocking_send(SnapshotChunk {
                message: None,
                data: buf,
            })
            .map_err(|_| "stream closed".to_string())?;
        }
    });
    let res = client
        .snapshot(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let read = reader.await.map_err(|e| e.to_string())?;
    read?;
    res.map_err(|s| format!("snapshot stream: {}", s.message()))?;
    Ok(())
}
