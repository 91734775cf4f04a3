#![allow(dead_code)] // helpers shared by the unit tests; not every test uses each one
//! In-process support for the raftstore's unit tests: a store context over the memory engine
//! with no thread running (tests drive the pollers' `handle`/`end` by hand), and a transport
//! that records what it is given.

use crate::batch::{BatchSystem, PollHandler};
use crate::fsm::apply::{ApplyFsm, ApplyMsg};
use crate::fsm::apply_poller::ApplyPoller;
use crate::fsm::context::{StoreContext, StoreReceivers};
use crate::fsm::peer::PeerFsm;
use crate::fsm::raft_poller::RaftPoller;
use crate::msg::{PeerMsg, WriteResponse};
use crate::raft::peer::Peer;
use crate::snap::SnapManager;
use crate::transport::Transport;
use crate::Config;
use atoll_engine::memory::MemoryEngine;
use atoll_engine::{KvEngine, Peekable};
use atoll_proto::metapb;
use atoll_proto::raft_cmdpb::{
    AdminCmdType, AdminRequest, CmdType, PutRequest, RaftCmdRequest, Request,
};
use atoll_proto::raft_serverpb::{RaftMessage, SnapshotMeta};
use parking_lot::Mutex;
use protobuf::Message as PbMessage;
use raft::eraftpb::{self, MessageType};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Looks at each message as it is sent (e.g. at what the engine holds at that moment).
pub type SendProbe = Box<dyn FnMut(&RaftMessage) + Send>;

/// Keeps every message it is asked to send; counts flushes.
#[derive(Default)]
pub struct RecordingTransport {
    pub sent: Mutex<Vec<RaftMessage>>,
    pub snapshots: Mutex<Vec<(RaftMessage, SnapshotMeta)>>,
    pub flushes: AtomicUsize,
    pub probe: Mutex<Option<SendProbe>>,
}

impl RecordingTransport {
    pub fn take(&self) -> Vec<RaftMessage> {
        std::mem::take(&mut *self.sent.lock())
    }

    /// The raft messages sent so far (taken), decoded, with their target peer.
    pub fn take_raft(&self) -> Vec<(metapb::Peer, eraftpb::Message)> {
        self.take()
            .into_iter()
            .filter(|m| m.extra == 0 && !m.is_tombstone)
            .map(|m| (m.to_peer.unwrap_or_default(), decode(&m)))
            .collect()
    }

    /// Whether a raft message of `kind` was sent (and not taken yet).
    pub fn has_sent(&self, kind: MessageType) -> bool {
        self.sent
            .lock()
            .iter()
            .any(|m| m.extra == 0 && !m.is_tombstone && decode(m).get_msg_type() == kind)
    }
}

pub fn decode(m: &RaftMessage) -> eraftpb::Message {
    eraftpb::Message::parse_from_bytes(&m.message).expect("raft message")
}

impl Transport for RecordingTransport {
    fn send(&self, msg: RaftMessage) -> bool {
        if let Some(p) = self.probe.lock().as_mut() {
            p(&msg);
        }
        self.sent.lock().push(msg);
        true
    }
    fn send_snapshot(&self, msg: RaftMessage, meta: SnapshotMeta) -> bool {
        self.snapshots.lock().push((msg, meta));
        true
    }
    fn flush(&self) {
        self.flushes.fetch_add(1, Ordering::SeqCst);
    }
}

/// A store's shared context with nothing started.
pub struct TestStore {
    pub ctx: Arc<StoreContext<MemoryEngine>>,
    pub trans: Arc<RecordingTransport>,
    pub receivers: StoreReceivers<MemoryEngine>,
    pub poller: RaftPoller<MemoryEngine>,
    pub apply_poller: ApplyPoller<MemoryEngine>,
    _systems: (
        BatchSystem<PeerFsm<MemoryEngine>>,
        BatchSystem<ApplyFsm<MemoryEngine>>,
    ),
    _dir: tempfile::TempDir,
}

pub fn test_config() -> Config {
    Config {
        hibernate_regions: false,
        ..Config::default()
    }
}

impl TestStore {
    pub fn new(store_id: u64) -> Self {
        Self::with_config(store_id, test_config())
    }

    /// A store whose [`test_config`] `tune` changes.
    pub fn configured(store_id: u64, tune: impl FnOnce(&mut Config)) -> Self {
        let mut cfg = test_config();
        tune(&mut cfg);
        Self::with_config(store_id, cfg)
    }

    /// Store 1 with region 1 (all keys) led by its single voter 11.
    pub fn single_leader() -> (Self, TestRegion) {
        let mut s = Self::new(1);
        let r = s.leader_region(1, b"", b"");
        (s, r)
    }

    /// Store 1 with region 1 (all keys, voters 11, 12 and 13 on stores 1 to 3) led by 11.
    pub fn three_voters_led_here(tune: impl FnOnce(&mut Config)) -> (Self, TestRegion) {
        let mut s = Self::configured(1, tune);
        let mut r = s.new_region(1, b"", b"", &[(11, 1), (12, 2), (13, 3)]);
        s.campaign(&mut r, &[12, 13]);
        (s, r)
    }

    pub fn with_config(store_id: u64, cfg: Config) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let trans = Arc::new(RecordingTransport::default());
        let snap_mgr = SnapManager::new(dir.path().join("snap")).expect("snap dir");
        let (ctx, systems, receivers) =
            StoreContext::build(store_id, cfg, MemoryEngine::new(), trans.clone(), snap_mgr);
        let poller = RaftPoller::new(ctx.clone());
        let apply_poller = ApplyPoller::new(ctx.clone());
        TestStore {
            ctx,
            trans,
            receivers,
            poller,
            apply_poller,
            _systems: systems,
            _dir: dir,
        }
    }

    pub fn engine(&self) -> &MemoryEngine {
        &self.ctx.engine
    }

    /// A region with the given `(peer id, store id)` voters, its initial states written and
    /// its range registered, and this store's peer of it (not yet started).
    pub fn create_region(
        &self,
        region_id: u64,
        start: &[u8],
        end: &[u8],
        peers: &[(u64, u64)],
    ) -> Box<PeerFsm<MemoryEngine>> {
        let region = region_of(region_id, start, end, peers);
        crate::bootstrap::prepare_bootstrap_region(&self.ctx.engine, &region).expect("bootstrap");
        self.ctx.meta.lock().set_region(&region);
        let me = *crate::util::find_peer(&region, self.ctx.store_id).expect("a peer here");
        PeerFsm::create(&self.ctx, region, me).expect("create peer")
    }

    /// One poll round over `fsm` with `msgs`, as a poller runs it.
    pub fn round(
        &mut self,
        fsm: &mut Box<PeerFsm<MemoryEngine>>,
        msgs: Vec<PeerMsg<MemoryEngine>>,
    ) {
        self.handle(fsm, msgs);
        self.end(fsm);
    }

    /// The first half of a round: messages handled, the ready staged, nothing written.
    pub fn handle(
        &mut self,
        fsm: &mut Box<PeerFsm<MemoryEngine>>,
        msgs: Vec<PeerMsg<MemoryEngine>>,
    ) {
        self.poller.begin(1);
        let mut q: VecDeque<_> = msgs.into();
        self.poller.handle(fsm, &mut q);
    }

    /// The second half: the round's write, then what depends on it.
    pub fn end(&mut self, fsm: &mut Box<PeerFsm<MemoryEngine>>) {
        let batch = std::slice::from_mut(fsm);
        self.poller.end(batch);
    }

    /// Whether the engine holds `cf`/`key`.
    pub fn has(&self, cf: &str, key: &[u8]) -> bool {
        self.ctx
            .engine
            .get_value_cf(cf, key)
            .expect("read")
            .is_some()
    }

    pub fn put(&self, cf: &str, key: &[u8], value: &[u8]) {
        use atoll_engine::WriteBatch;
        let mut wb = self.ctx.engine.write_batch();
        wb.put_cf(cf, key, value).expect("put");
        self.ctx.engine.write(wb, false).expect("write");
    }

    /// A region as [`Self::create_region`] makes it, with its apply side, and stand-in FSMs
    /// registered in both routers so that what the pollers send to the region queues in its
    /// mailboxes for the test to take ([`Self::settle`] runs it all by hand).
    pub fn new_region(
        &mut self,
        region_id: u64,
        start: &[u8],
        end: &[u8],
        peers: &[(u64, u64)],
    ) -> TestRegion {
        let fsm = self.create_region(region_id, start, end, peers);
        let region = fsm.peer.region().clone();
        let me = fsm.peer.meta;
        let apply_state = fsm.peer.raft_group.store().apply_state;
        let apply = ApplyFsm::new(region.clone(), me.id, apply_state);
        self.register_stand_ins(&region, me);
        TestRegion { fsm, apply }
    }

    pub fn register_stand_ins(&self, region: &metapb::Region, me: metapb::Peer) {
        let apply_state = crate::raft::storage::load_apply_state(self.engine(), region.id)
            .expect("apply state")
            .unwrap_or_default();
        self.ctx
            .apply_router
            .register(region.id, ApplyFsm::new(region.clone(), me.id, apply_state));
        let stand_in = PeerFsm::create(&self.ctx, region.clone(), me).expect("stand-in");
        self.ctx.router.register(region.id, stand_in);
    }

    /// What was sent to the region's raft side (taken).
    pub fn take_peer_msgs(&self, region_id: u64) -> Vec<PeerMsg<MemoryEngine>> {
        let mut q = VecDeque::new();
        if let Some(mb) = self.ctx.router.mailbox(region_id) {
            mb.drain_into(&mut q);
        }
        q.into()
    }

    /// What was sent to the region's apply side (taken).
    pub fn take_apply_msgs(&self, region_id: u64) -> Vec<ApplyMsg> {
        let mut q = VecDeque::new();
        if let Some(mb) = self.ctx.apply_router.mailbox(region_id) {
            mb.drain_into(&mut q);
        }
        q.into()
    }

    /// One apply round over `apply` with `msgs`, as the apply poller runs it.
    pub fn apply_round(&mut self, apply: &mut Box<ApplyFsm<MemoryEngine>>, msgs: Vec<ApplyMsg>) {
        self.apply_poller.begin(1);
        let mut q: VecDeque<_> = msgs.into();
        self.apply_poller.handle(apply, &mut q);
        self.apply_poller.end(std::slice::from_mut(apply));
    }

    /// Runs the region's raft and apply sides by hand until neither has anything left to do.
    pub fn settle(&mut self, r: &mut TestRegion) {
        let id = r.fsm.region_id();
        for _ in 0..50 {
            let a = self.take_apply_msgs(id);
            let busy = !a.is_empty();
            if busy {
                self.apply_round(&mut r.apply, a);
            }
            let p = self.take_peer_msgs(id);
            if !busy && p.is_empty() && (r.fsm.stopped || !r.fsm.peer.raft_group.has_ready()) {
                return;
            }
            self.round(&mut r.fsm, p);
        }
        panic!("region {id} did not settle");
    }

    /// A single-voter region on this store whose peer leads, with its first entry applied.
    pub fn leader_region(&mut self, region_id: u64, start: &[u8], end: &[u8]) -> TestRegion {
        let peer_id = region_id * 10 + self.ctx.store_id;
        let mut r = self.new_region(region_id, start, end, &[(peer_id, self.ctx.store_id)]);
        self.round(&mut r.fsm, vec![PeerMsg::Start]);
        self.settle(&mut r);
        assert!(r.fsm.peer.leader_ready(), "the single voter leads");
        r
    }

    /// Proposes `cmd` in one round; the answer comes once it is applied.
    pub fn propose(&mut self, r: &mut TestRegion, cmd: RaftCmdRequest) -> WriteAnswer {
        let res = self.handle_cmd(r, cmd);
        self.end(&mut r.fsm);
        res
    }

    /// Handles a proposal of `cmd` (the first half of a round: nothing written yet).
    pub fn handle_cmd(&mut self, r: &mut TestRegion, cmd: RaftCmdRequest) -> WriteAnswer {
        let (msg, res) = request(|cb| PeerMsg::RaftCommand {
            cmd: Box::new(cmd),
            cb,
        });
        self.handle(&mut r.fsm, vec![msg]);
        res
    }

    /// Proposes `cmd` and runs the region until it is answered.
    pub fn must_answer_cmd(
        &mut self,
        r: &mut TestRegion,
        cmd: RaftCmdRequest,
    ) -> crate::Result<WriteResponse> {
        let res = self.propose(r, cmd);
        self.settle(r);
        must_answer(&res)
    }

    /// Writes `key` = `value` through raft and the apply side; it must succeed.
    pub fn must_write(&mut self, r: &mut TestRegion, key: &[u8], value: &[u8]) -> WriteResponse {
        let cmd = r.put_cmd(key, value);
        match self.must_answer_cmd(r, cmd) {
            Ok(w) => w,
            Err(e) => panic!("write refused: {e}"),
        }
    }

    /// Answers, as the other peers in `from` would, every raft message the local peer sent
    /// them (votes granted, appends accepted, heartbeats answered); returns how many.
    pub fn reply_as(&mut self, r: &mut TestRegion, from: &[u64]) -> usize {
        let mut replies = vec![];
        for (to, m) in self.trans.take_raft() {
            if !from.contains(&to.id) {
                continue;
            }
            let mut resp = eraftpb::Message {
                to: m.from,
                from: m.to,
                term: m.term,
                ..Default::default()
            };
            match m.get_msg_type() {
                MessageType::MsgRequestPreVote => {
                    resp.set_msg_type(MessageType::MsgRequestPreVoteResponse)
                }
                MessageType::MsgRequestVote => {
                    resp.set_msg_type(MessageType::MsgRequestVoteResponse)
                }
                MessageType::MsgAppend => {
                    resp.set_msg_type(MessageType::MsgAppendResponse);
                    resp.index = m.index + m.get_entries().len() as u64;
                }
                MessageType::MsgHeartbeat => {
                    resp.set_msg_type(MessageType::MsgHeartbeatResponse);
                    resp.context = m.context.clone();
                }
                _ => continue,
            }
            replies.push(self.raft_msg(r, to, resp));
        }
        let n = replies.len();
        if n > 0 {
            self.round(&mut r.fsm, replies);
        }
        n
    }

    /// Leader 11's append (term 6) of entry `index` to the local peer, committing `commit`.
    pub fn leader_append(&self, r: &TestRegion, index: u64, commit: u64) -> PeerMsg<MemoryEngine> {
        let mut m = eraftpb::Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        (m.from, m.to, m.term, m.commit) = (11, r.fsm.peer.meta.id, 6, commit);
        // Entries up to the initial index 5 are of term 5, later ones of term 6.
        (m.index, m.log_term) = (index - 1, if index - 1 <= 5 { 5 } else { 6 });
        m.set_entries(
            vec![eraftpb::Entry {
                index,
                term: 6,
                ..Default::default()
            }]
            .into(),
        );
        self.raft_msg(r, r.peer(11), m)
    }

    /// `m` from peer `from` to the region's local peer, as the transport delivers it.
    pub fn raft_msg(
        &self,
        r: &TestRegion,
        from: metapb::Peer,
        m: eraftpb::Message,
    ) -> PeerMsg<MemoryEngine> {
        let region = r.fsm.peer.region();
        PeerMsg::RaftMessage(Box::new(RaftMessage {
            region_id: region.id,
            from_peer: Some(from),
            to_peer: Some(r.fsm.peer.meta),
            region_epoch: region.region_epoch,
            start_key: region.start_key.clone(),
            end_key: region.end_key.clone(),
            message: m.write_to_bytes().expect("encode"),
            ..Default::default()
        }))
    }

    /// Starts the local peer of a multi-peer region and makes it leader with the votes of
    /// `voters`, who then accept its first entry.
    pub fn campaign(&mut self, r: &mut TestRegion, voters: &[u64]) {
        let campaign = PeerMsg::Casual(crate::msg::CasualMessage::Campaign);
        self.round(&mut r.fsm, vec![PeerMsg::Start, campaign]);
        for _ in 0..6 {
            if self.reply_as(r, voters) == 0 {
                break;
            }
        }
        self.settle(r);
        assert!(r.fsm.peer.is_leader(), "won the election");
    }
}

/// A region's raft side and apply side, driven by hand.
pub struct TestRegion {
    pub fsm: Box<PeerFsm<MemoryEngine>>,
    pub apply: Box<ApplyFsm<MemoryEngine>>,
}

impl TestRegion {
    pub fn id(&self) -> u64 {
        self.fsm.region_id()
    }

    pub fn peer(&self, id: u64) -> metapb::Peer {
        *crate::util::find_peer_by_id(self.fsm.peer.region(), id).expect("a peer of the region")
    }

    /// A put of `key` (a user key) as a command for this region as it is now.
    pub fn put_cmd(&self, key: &[u8], value: &[u8]) -> RaftCmdRequest {
        put_cmd(&self.fsm.peer, key, value)
    }
}

/// Region `id` over `[start, end)` with the given `(peer id, store id)` voters, epoch 1/1.
pub fn region_of(id: u64, start: &[u8], end: &[u8], peers: &[(u64, u64)]) -> metapb::Region {
    metapb::Region {
        id,
        start_key: start.to_vec(),
        end_key: end.to_vec(),
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: 1,
            version: 1,
        }),
        peers: peers
            .iter()
            .map(|(id, store)| metapb::Peer {
                id: *id,
                store_id: *store,
                role: metapb::PeerRole::Voter as i32,
            })
            .collect(),
    }
}

/// An admin command of `kind` for `r`'s region as it is now; `fill` sets its body.
pub fn admin_cmd(
    r: &TestRegion,
    kind: AdminCmdType,
    fill: impl FnOnce(&mut AdminRequest),
) -> RaftCmdRequest {
    let mut admin = AdminRequest {
        cmd_type: kind as i32,
        ..Default::default()
    };
    fill(&mut admin);
    RaftCmdRequest {
        header: Some(r.fsm.peer.header()),
        requests: vec![],
        admin_request: Some(admin),
    }
}

/// A request message whose callback leaves its answer for the test.
pub fn request<T: Send + 'static>(
    make: impl FnOnce(Box<dyn FnOnce(T) + Send>) -> PeerMsg<MemoryEngine>,
) -> (PeerMsg<MemoryEngine>, Answer<T>) {
    let (cb, res) = capture();
    (make(cb), res)
}

/// An epoch older than any region's in these tests.
pub fn stale_epoch() -> metapb::RegionEpoch {
    metapb::RegionEpoch {
        conf_ver: 1,
        version: 0,
    }
}

/// The peer's log did not grow past `last` (nothing was proposed).
pub fn must_not_append(r: &TestRegion, last: u64) {
    let now = r.fsm.peer.raft_group.store().last_index();
    assert_eq!(now, last, "nothing proposed");
}

/// A put of `key` (a user key) as a command for `peer`'s region as it is now.
pub fn put_cmd(peer: &Peer<MemoryEngine>, key: &[u8], value: &[u8]) -> RaftCmdRequest {
    RaftCmdRequest {
        header: Some(peer.header()),
        requests: vec![Request {
            cmd_type: CmdType::Put as i32,
            put: Some(PutRequest {
                cf: atoll_engine::CF_DEFAULT.to_string(),
                key: atoll_keys::data_key(key),
                value: value.to_vec(),
            }),
            ..Default::default()
        }],
        admin_request: None,
    }
}

/// Where a captured callback leaves its answer.
pub type Answer<T> = Arc<Mutex<Option<T>>>;

pub type WriteAnswer = Answer<crate::Result<WriteResponse>>;

/// A callback that keeps its answer for the test to look at.
pub fn capture<T: Send + 'static>() -> (Box<dyn FnOnce(T) + Send>, Answer<T>) {
    let slot = Arc::new(Mutex::new(None));
    let s = slot.clone();
    (Box::new(move |r| *s.lock() = Some(r)), slot)
}

/// The answer a captured callback got (it must have been called).
pub fn must_answer<T>(slot: &Answer<T>) -> T {
    slot.lock().take().expect("the callback was answered")
}

/// The error a captured callback got (it must have been called with one).
pub fn must_fail<T>(slot: &Answer<crate::Result<T>>) -> crate::Error {
    match must_answer(slot) {
        Ok(_) => panic!("expected an error, got an answer"),
        Err(e) => e,
    }
}

/// The answer a captured callback got, which must be a success.
pub fn must_succeed<T>(slot: &Answer<crate::Result<T>>) -> T {
    match must_answer(slot) {
        Ok(v) => v,
        Err(e) => panic!("expected success, got {e}"),
    }
}
