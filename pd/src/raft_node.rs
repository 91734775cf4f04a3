//! PD's own raft group: one `RawNode` driven by one thread, its log in PD's RocksDB, its state
//! machine [`MetaState`]. Members are fixed by `--initial-cluster` (ids derived from names).
//!
//! The thread takes proposals, read-index requests and peer messages from a channel, ticks,
//! and handles each `Ready`: persist (synced), send, apply, advance. Every member applies,
//! so every member holds the full metadata in memory.

use crate::state::MetaState;
use atoll_engine::{KvEngine, Peekable, WriteBatch, CF_RAFT};
use atoll_engine_rocks::RocksEngine;
use atoll_proto::pdpb::{PdCommand, PdSnapshot};
use atoll_proto::raft_serverpb::RaftLocalState;
use atoll_proto::Message as _;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::RwLock;
use protobuf::Message as PbMessage;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Message, Snapshot};
use raft::{GetEntriesContext, RaftState, RawNode, StateRole, Storage, StorageError};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const LOG_PREFIX: &[u8] = b"pd/log/";
const HS_KEY: &[u8] = b"pd/hs";
const TRUNCATED_KEY: &[u8] = b"pd/truncated";

fn log_key(index: u64) -> Vec<u8> {
    let mut k = LOG_PREFIX.to_vec();
    k.extend_from_slice(&index.to_be_bytes());
    k
}

#[derive(Debug, thiserror::Error, Clone)]
pub enum NodeError {
    #[error("not leader")]
    NotLeader,
    #[error("proposal dropped: {0}")]
    Dropped(String),
    #[error("raft node stopped")]
    Stopped,
    #[error("timed out")]
    Timeout,
}

pub type Callback = oneshot::Sender<Result<(), NodeError>>;

pub enum NodeMsg {
    Propose {
        cmd: PdCommand,
        cb: Callback,
    },
    /// Confirms leadership now (a quorum acknowledges it) and that everything committed
    /// so far is applied.
    ReadIndex {
        cb: Callback,
    },
    Raft(Box<Message>),
    Stop,
}

/// What the rest of PD may read about the group without a message.
#[derive(Default)]
pub struct NodeStatus {
    pub id: u64,
    pub leader_id: AtomicU64,
    pub term: AtomicU64,
    pub is_leader: AtomicBool,
    /// Leader that has committed an entry of its own term (its state is complete).
    pub leader_ready: AtomicBool,
    /// Bumped each time this member becomes ready as leader.
    pub leader_epoch: AtomicU64,
}

impl NodeStatus {
    pub fn is_ready_leader(&self) -> bool {
        self.is_leader.load(Ordering::Acquire) && self.leader_ready.load(Ordering::Acquire)
    }
    pub fn leader_id(&self) -> u64 {
        self.leader_id.load(Ordering::Acquire)
    }
    /// The current leadership's epoch, if this member leads and is ready to serve (the epoch
    /// is read first, so a leadership change in between shows as a different epoch later).
    pub fn ready_leader_epoch(&self) -> Result<u64, NodeError> {
        let epoch = self.leader_epoch.load(Ordering::Acquire);
        if self.is_ready_leader() {
            Ok(epoch)
        } else {
            Err(NodeError::NotLeader)
        }
    }
}

/// The log kept in memory (PD's log is small: it is compacted into state snapshots).
struct LogCore {
    hs: HardState,
    cs: ConfState,
    snap_index: u64,
    snap_term: u64,
    entries: Vec<Entry>,
}

impl LogCore {
    fn first_index(&self) -> u64 {
        self.snap_index + 1
    }
    fn last_index(&self) -> u64 {
        self.snap_index + self.entries.len() as u64
    }
}

#[derive(Clone)]
pub struct PdStorage {
    core: Arc<RwLock<LogCore>>,
    state: Arc<RwLock<MetaState>>,
}

impl Storage for PdStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let c = self.core.read();
        Ok(RaftState::new(c.hs.clone(), c.cs.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let c = self.core.read();
        if low < c.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > c.last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let off = c.first_index();
        let mut ents: Vec<Entry> = c.entries[(low - off) as usize..(high - off) as usize].to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let c = self.core.read();
        if idx == c.snap_index {
            return Ok(c.snap_term);
        }
        if idx < c.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > c.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(c.entries[(idx - c.first_index()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.core.read().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.core.read().last_index())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let st = self.state.read();
        if st.applied_index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut s = Snapshot {
            data: st.dump().encode_to_vec().into(),
            ..Default::default()
        };
        let md = s.mut_metadata();
        md.index = st.applied_index;
        md.term = st.applied_term;
        md.set_conf_state(self.core.read().cs.clone());
        Ok(s)
    }
}

pub struct RaftNodeConfig {
    pub id: u64,
    pub voters: Vec<u64>,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub log_compact_threshold: u64,
}

/// Sends raft messages to other members.
pub trait PeerSender: Send + Sync + 'static {
    fn send(&self, msgs: Vec<Message>);
}

pub struct RaftNode {
    tx: Sender<NodeMsg>,
    pub status: Arc<NodeStatus>,
    pub state: Arc<RwLock<MetaState>>,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl RaftNode {
    pub fn start(
        cfg: RaftNodeConfig,
        engine: RocksEngine,
        peers: Arc<dyn PeerSender>,
    ) -> Result<Arc<Self>, String> {
        let state = Arc::new(RwLock::new(
            MetaState::load(&engine).map_err(|e| e.to_string())?,
        ));
        let mut hs = HardState::default();
        if let Some(v) = engine
            .get_value_cf(CF_RAFT, HS_KEY)
            .map_err(|e| e.to_string())?
        {
            let s = RaftLocalState::decode(v.as_slice()).map_err(|e| e.to_string())?;
            hs.term = s.term;
            hs.vote = s.vote;
            hs.commit = s.commit;
        }
        let (mut snap_index, mut snap_term) = (0, 0);
        if let Some(v) = engine
            .get_value_cf(CF_RAFT, TRUNCATED_KEY)
            .map_err(|e| e.to_string())?
        {
            if v.len() == 16 {
                snap_index = u64::from_be_bytes(v[..8].try_into().unwrap_or_default());
                snap_term = u64::from_be_bytes(v[8..].try_into().unwrap_or_default());
            }
        }
        let mut entries = vec![];
        let mut next = snap_index + 1;
        let mut end = LOG_PREFIX.to_vec();
        end.extend_from_slice(&[0xff; 9]);
        atoll_engine::Iterable::scan_cf(
            &engine,
            CF_RAFT,
            &log_key(snap_index + 1),
            Some(&end),
            true,
            |_, v| {
                let e = Entry::parse_from_bytes(v)
                    .map_err(|e| atoll_engine::Error::Corruption(e.to_string()))?;
                if e.index != next {
                    return Ok(false);
                }
                next += 1;
                entries.push(e);
                Ok(true)
            },
        )
        .map_err(|e| e.to_string())?;
        let applied = state.read().applied_index.max(snap_index);
        hs.commit = hs.commit.max(applied);
        let cs = ConfState::from((cfg.voters.clone(), vec![]));
        let storage = PdStorage {
            core: Arc::new(RwLock::new(LogCore {
                hs,
                cs,
                snap_index,
                snap_term,
                entries,
            })),
            state: state.clone(),
        };
        let rcfg = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 4 << 20,
            max_inflight_msgs: 256,
            read_only_option: raft::ReadOnlyOption::Safe,
            ..Default::default()
        };
        let logger = atoll_util::logging::raft_logger(slog::o!("pd_member" => cfg.id));
        let raw = RawNode::new(&rcfg, storage.clone(), &logger).map_err(|e| e.to_string())?;
        let (tx, rx) = crossbeam_channel::bounded(65536);
        let status = Arc::new(NodeStatus {
            id: cfg.id,
            ..Default::default()
        });
        let node = Arc::new(RaftNode {
            tx,
            status: status.clone(),
            state: state.clone(),
            thread: parking_lot::Mutex::new(None),
        });
        let mut driver = Driver {
            raw,
            storage,
            engine,
            state,
            status,
            peers,
            rx,
            tick: cfg.tick,
            compact_threshold: cfg.log_compact_threshold,
            proposals: VecDeque::new(),
            reads: HashMap::new(),
            read_seq: 0,
            pending_reads: vec![],
        };
        let h = std::thread::Builder::new()
            .name("pd-raft".into())
            .spawn(move || driver.run())
            .map_err(|e| e.to_string())?;
        *node.thread.lock() = Some(h);
        Ok(node)
    }

    pub fn step(&self, m: Message) {
        let _ = self.tx.try_send(NodeMsg::Raft(Box::new(m)));
    }

    pub async fn propose(&self, cmd: PdCommand) -> Result<(), NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .try_send(NodeMsg::Propose { cmd, cb: tx })
            .map_err(|_| NodeError::Dropped("PD raft queue full".into()))?;
        match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(NodeError::Stopped),
            Err(_) => Err(NodeError::Timeout),
        }
    }

    pub async fn read_index(&self) -> Result<(), NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .try_send(NodeMsg::ReadIndex { cb: tx })
            .map_err(|_| NodeError::Dropped("PD raft queue full".into()))?;
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(NodeError::Stopped),
            Err(_) => Err(NodeError::Timeout),
        }
    }

    pub fn stop(&self) {
        let _ = self.tx.send(NodeMsg::Stop);
        if let Some(h) = self.thread.lock().take() {
            let _ = h.join();
        }
    }
}

struct Proposal {
    index: u64,
    term: u64,
    cb: Callback,
}

struct Driver {
    raw: RawNode<PdStorage>,
    storage: PdStorage,
    engine: RocksEngine,
    state: Arc<RwLock<MetaState>>,
    status: Arc<NodeStatus>,
    peers: Arc<dyn PeerSender>,
    rx: Receiver<NodeMsg>,
    tick: Duration,
    compact_threshold: u64,
    proposals: VecDeque<Proposal>,
    /// read ctx -> callbacks waiting for that read index
    reads: HashMap<u64, Vec<Callback>>,
    read_seq: u64,
    /// Reads that arrived before the leader committed in its term.
    pending_reads: Vec<Callback>,
}

impl Driver {
    fn run(&mut self) {
        let mut next_tick = Instant::now() + self.tick;
        loop {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(timeout) {
                Ok(NodeMsg::Stop) => break,
                Ok(m) => {
                    self.handle(m);
                    while let Ok(m) = self.rx.try_recv() {
                        if matches!(m, NodeMsg::Stop) {
                            return;
                        }
                        self.handle(m);
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_tick {
                self.raw.tick();
                next_tick = Instant::now() + self.tick;
            }
            self.issue_reads();
            if let Err(e) = self.on_ready() {
                tracing::error!(error = %e, "PD raft ready");
                panic!("PD cannot persist its raft state: {e}");
            }
        }
        for p in self.proposals.drain(..) {
            let _ = p.cb.send(Err(NodeError::Stopped));
        }
    }

    fn handle(&mut self, m: NodeMsg) {
        match m {
            NodeMsg::Propose { cmd, cb } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = cb.send(Err(NodeError::NotLeader));
                    return;
                }
                let last = self.raw.raft.raft_log.last_index();
                if let Err(e) = self.raw.propose(vec![], cmd.encode_to_vec()) {
                    let _ = cb.send(Err(NodeError::Dropped(e.to_string())));
                    return;
                }
                let index = self.raw.raft.raft_log.last_index();
                if index == last {
                    let _ = cb.send(Err(NodeError::NotLeader));
                    return;
                }
                self.proposals.push_back(Proposal {
                    index,
                    term: self.raw.raft.term,
                    cb,
                });
            }
            NodeMsg::ReadIndex { cb } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = cb.send(Err(NodeError::NotLeader));
                    return;
                }
                self.pending_reads.push(cb);
            }
            NodeMsg::Raft(m) => {
                let _ = self.raw.step(*m);
            }
            NodeMsg::Stop => {}
        }
    }

    fn issue_reads(&mut self) {
        if self.pending_reads.is_empty() {
            return;
        }
        if self.raw.raft.state != StateRole::Leader {
            for cb in self.pending_reads.drain(..) {
                let _ = cb.send(Err(NodeError::NotLeader));
            }
            return;
        }
        if !self.raw.raft.commit_to_current_term() {
            return;
        }
        self.read_seq += 1;
        let id = self.read_seq;
        self.raw.read_index(id.to_be_bytes().to_vec());
        self.reads
            .insert(id, std::mem::take(&mut self.pending_reads));
    }

    fn persist(&mut self, rd: &raft::Ready) -> atoll_engine::Result<()> {
        let mut wb = self.engine.write_batch();
        let mut core = self.storage.core.write();
        if !rd.snapshot().is_empty() {
            let s = rd.snapshot();
            let idx = s.get_metadata().index;
            let term = s.get_metadata().term;
            let dump = PdSnapshot::decode(s.get_data())
                .map_err(|e| atoll_engine::Error::Corruption(e.to_string()))?;
            self.state.write().restore(&dump, idx, term, &self.engine)?;
            core.entries.clear();
            core.snap_index = idx;
            core.snap_term = term;
            core.hs.commit = core.hs.commit.max(idx);
            let mut t = idx.to_be_bytes().to_vec();
            t.extend_from_slice(&term.to_be_bytes());
            wb.put_cf(CF_RAFT, TRUNCATED_KEY, &t)?;
            wb.delete_range_cf(CF_RAFT, &log_key(0), &log_key(idx + 1))?;
        }
        if let Some(first) = rd.entries().first() {
            let first_idx = first.index;
            let last = core.last_index();
            if first_idx <= last {
                let keep = (first_idx - core.first_index()) as usize;
                core.entries.truncate(keep);
                wb.delete_range_cf(CF_RAFT, &log_key(first_idx), &log_key(last + 1))?;
            }
            for e in rd.entries() {
                wb.put_cf(
                    CF_RAFT,
                    &log_key(e.index),
                    &e.write_to_bytes()
                        .map_err(|e| atoll_engine::Error::Other(e.to_string()))?,
                )?;
                core.entries.push(e.clone());
            }
        }
        if let Some(hs) = rd.hs() {
            core.hs = hs.clone();
            let s = RaftLocalState {
                term: hs.term,
                vote: hs.vote,
                commit: hs.commit,
                last_index: 0,
                last_term: 0,
            };
            wb.put_cf(CF_RAFT, HS_KEY, &s.encode_to_vec())?;
        }
        drop(core);
        if !wb.is_empty() {
            self.engine
                .write(wb, rd.must_sync() || !rd.snapshot().is_empty())?;
        }
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> atoll_engine::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut wb = self.engine.write_batch();
        {
            let mut st = self.state.write();
            for e in &entries {
                if e.index <= st.applied_index {
                    continue;
                }
                match e.get_entry_type() {
                    EntryType::EntryNormal if !e.data.is_empty() => {
                        match PdCommand::decode(e.get_data()) {
                            Ok(cmd) => st.apply(&cmd, e.index, e.term, &mut wb)?,
                            Err(err) => {
                                tracing::error!(index = e.index, error = %err, "undecodable PD command");
                                st.set_applied(e.index, e.term, &mut wb)?;
                            }
                        }
                    }
                    _ => st.set_applied(e.index, e.term, &mut wb)?,
                }
            }
        }
        self.engine.write(wb, false)?;
        for e in &entries {
            while let Some(p) = self.proposals.front() {
                if p.index > e.index {
                    break;
                }
                let p = self.proposals.pop_front().expect("front exists");
                let r = if p.index == e.index && p.term == e.term {
                    Ok(())
                } else {
                    Err(NodeError::Dropped("superseded".into()))
                };
                let _ = p.cb.send(r);
            }
        }
        Ok(())
    }

    fn on_ready(&mut self) -> atoll_engine::Result<()> {
        if !self.raw.has_ready() {
            self.update_status();
            return Ok(());
        }
        let mut rd = self.raw.ready();
        self.peers.send(rd.take_messages());
        self.persist(&rd)?;
        self.peers.send(rd.take_persisted_messages());
        let read_states = rd.take_read_states();
        self.apply(rd.take_committed_entries())?;
        let mut light = self.raw.advance(rd);
        self.peers.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        for rs in read_states {
            let Ok(id) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()).map(u64::from_be_bytes)
            else {
                continue;
            };
            // Entries are applied synchronously above: the read index is applied.
            if let Some(cbs) = self.reads.remove(&id) {
                for cb in cbs {
                    let _ = cb.send(Ok(()));
                }
            }
        }
        self.update_status();
        self.maybe_compact()
    }

    fn update_status(&mut self) {
        let r = &self.raw.raft;
        let is_leader = r.state == StateRole::Leader;
        let was_leader = self.status.is_leader.swap(is_leader, Ordering::AcqRel);
        self.status.term.store(r.term, Ordering::Release);
        self.status.leader_id.store(r.leader_id, Ordering::Release);
        let ready = is_leader
            && r.commit_to_current_term()
            && self.state.read().applied_index >= r.raft_log.committed;
        let was_ready = self.status.leader_ready.swap(ready, Ordering::AcqRel);
        if ready && !was_ready {
            self.status.leader_epoch.fetch_add(1, Ordering::AcqRel);
        }
        if was_leader && !is_leader {
            for p in self.proposals.drain(..) {
                let _ = p.cb.send(Err(NodeError::NotLeader));
            }
            for (_, cbs) in self.reads.drain() {
                for cb in cbs {
                    let _ = cb.send(Err(NodeError::NotLeader));
                }
            }
        }
    }

    fn maybe_compact(&mut self) -> atoll_engine::Result<()> {
        let applied = self.state.read().applied_index;
        let (first, snap_index) = {
            let c = self.storage.core.read();
            (c.first_index(), c.snap_index)
        };
        if applied < first || applied - snap_index < self.compact_threshold {
            return Ok(());
        }
        let term = self.storage.term(applied).unwrap_or(0);
        if term == 0 {
            return Ok(());
        }
        let mut core = self.storage.core.write();
        let drop_n = (applied - core.snap_index) as usize;
        let n = drop_n.min(core.entries.len());
        core.entries.drain(..n);
        core.snap_index = applied;
        core.snap_term = term;
        drop(core);
        let mut wb = self.engine.write_batch();
        let mut t = applied.to_be_bytes().to_vec();
        t.extend_from_slice(&term.to_be_bytes());
        wb.put_cf(CF_RAFT, TRUNCATED_KEY, &t)?;
        wb.delete_range_cf(CF_RAFT, &log_key(0), &log_key(applied + 1))?;
        self.engine.write(wb, false)?;
        Ok(())
    }
}
