//! PD-to-PD raft transport: one outbound stream per other member (reconnecting with backoff),
//! and the `PdPeer` service receiving them. Every batch names its sender, so members learn
//! each other's client addresses.

use crate::cluster::Cluster;
use crate::raft_node::{PeerSender, RaftNode};
use atoll_proto::pdpb::pd_peer_client::PdPeerClient;
use atoll_proto::pdpb::pd_peer_server::PdPeer;
use atoll_proto::pdpb::{self, PdPeerDone, PdRaftBatch, PdRaftMessage};
use atoll_util::backoff::Backoff;
use atoll_util::tls::ClientTls;
use parking_lot::RwLock;
use protobuf::Message as PbMessage;
use raft::eraftpb::Message;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

pub struct PeerTransport {
    me: pdpb::Member,
    senders: RwLock<HashMap<u64, mpsc::Sender<Vec<Message>>>>,
    addrs: HashMap<u64, String>,
    runtime: tokio::runtime::Handle,
    /// TLS to the other members (`None`: plaintext).
    tls: Option<ClientTls>,
}

impl PeerTransport {
    pub fn new(
        me: pdpb::Member,
        peers: HashMap<u64, String>,
        runtime: tokio::runtime::Handle,
        tls: Option<ClientTls>,
    ) -> Arc<Self> {
        Arc::new(PeerTransport {
            me,
            senders: RwLock::new(HashMap::new()),
            addrs: peers,
            runtime,
            tls,
        })
    }

    fn sender(&self, to: u64) -> Option<mpsc::Sender<Vec<Message>>> {
        if let Some(s) = self.senders.read().get(&to) {
            return Some(s.clone());
        }
        let addr = self.addrs.get(&to)?.clone();
        let (tx, rx) = mpsc::channel(1024);
        self.senders.write().insert(to, tx.clone());
        let me = self.me.clone();
        self.runtime.spawn(run_peer(me, addr, self.tls.clone(), rx));
        Some(tx)
    }
}

impl PeerSender for PeerTransport {
    fn send(&self, msgs: Vec<Message>) {
        if msgs.is_empty() {
            return;
        }
        let mut by_to: HashMap<u64, Vec<Message>> = HashMap::new();
        for m in msgs {
            by_to.entry(m.to).or_default().push(m);
        }
        for (to, ms) in by_to {
            if let Some(tx) = self.sender(to) {
                let _ = tx.try_send(ms);
            }
        }
    }
}

async fn run_peer(
    me: pdpb::Member,
    addr: String,
    tls: Option<ClientTls>,
    mut rx: mpsc::Receiver<Vec<Message>>,
) {
    let far = Instant::now() + Duration::from_secs(10 * 365 * 24 * 3600);
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1), far);
    loop {
        let ch = match atoll_util::tls::endpoint(&addr, tls.as_ref()) {
            Ok(ep) => {
                let ep = ep.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true);
                atoll_util::tls::connect(ep, tls.as_ref()).await
            }
            Err(e) => {
                tracing::error!(%addr, error = %e, "bad PD peer address");
                return;
            }
        };
        let ch = match ch {
            Ok(c) => c,
            Err(_) => {
                // Drop what queued meanwhile: raft resends.
                while rx.try_recv().is_ok() {}
                backoff.wait().await;
                continue;
            }
        };
        backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1), far);
        let (tx, out) = mpsc::channel::<PdRaftBatch>(256);
        let mut client = PdPeerClient::new(ch)
            .max_decoding_message_size(512 << 20)
            .max_encoding_message_size(512 << 20);
        let mut call = tokio::spawn(async move {
            client
                .raft(tokio_stream::wrappers::ReceiverStream::new(out))
                .await
        });
        loop {
            tokio::select! {
                ms = rx.recv() => {
                    let Some(mut ms) = ms else { return };
                    while let Ok(more) = rx.try_recv() {
                        ms.extend(more);
                    }
                    let msgs = ms.into_iter().filter_map(|m| m.write_to_bytes().ok()).map(|b| PdRaftMessage { cluster_id: 0, message: b }).collect();
                    if tx.send(PdRaftBatch { msgs, from: Some(me.clone()) }).await.is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    // Keep-alive that also advertises this member.
                    if tx.send(PdRaftBatch { msgs: vec![], from: Some(me.clone()) }).await.is_err() {
                        break;
                    }
                }
                _ = &mut call => break,
            }
        }
        call.abort();
        backoff.wait().await;
    }
}

pub struct PdPeerService {
    pub node: Arc<RaftNode>,
    pub cluster: Arc<OnceLock<Arc<Cluster>>>,
}

#[tonic::async_trait]
impl PdPeer for PdPeerService {
    async fn raft(
        &self,
        req: Request<Streaming<PdRaftBatch>>,
    ) -> Result<Response<PdPeerDone>, Status> {
        let mut s = req.into_inner();
        while let Some(batch) = s.message().await? {
            if let (Some(m), Some(c)) = (&batch.from, self.cluster.get()) {
                let known = c.peer_members.read().get(&m.member_id) == Some(m);
                if !known {
                    c.peer_members.write().insert(m.member_id, m.clone());
                }
            }
            for pm in batch.msgs {
                match Message::parse_from_bytes(&pm.message) {
                    Ok(m) => self.node.step(m),
                    Err(e) => tracing::warn!(error = %e, "bad PD raft message"),
                }
            }
        }
        Ok(Response::new(PdPeerDone {}))
    }
}
