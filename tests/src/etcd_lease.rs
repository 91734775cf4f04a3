//! Recording etcd leases, elections and locks over gRPC, for [`crate::lease_check`] and
//! [`crate::fence_check`]: the lease, election and lock workers of the chaos suite.
//!
//! Every worker talks to one store at a time and moves to the next one after an error or a
//! call unanswered in time (as the etcd writers and watchers of the suite do). Times are
//! [`Ns`] since [`Clock::base`].
//!
//! - [`lease_keeper`]: grants a lease (TTL 3–6 s), puts 1–3 keys with it (spread over the
//!   regions under its prefix), keeps it alive over a KeepAlive stream (every TTL/3, as etcd's
//!   clients), then either revokes it or lets it lapse at a random moment; records a
//!   [`LeaseLog`].
//! - [`lease_observer`]: a linearizable Range over the leased keys, again and again.
//! - [`owner_poller`]: asks PD which region and leader hold each lease's record, recording an
//!   [`OwnerSeen`] when first seen and whenever that changes.
//! - [`candidate`]: campaigns on an election with its own lease; as leader writes log records
//!   through Txns guarded by its key's `create_revision` (the fence); resigns or lets its lease
//!   go.
//! - [`lock_worker`]: takes a lock with its own lease, increments a counter under it through a
//!   Txn guarded by the lock key's `create_revision`, unlocks.

use crate::etcd_watch::channel;
use crate::fence_check::{GuardOutcome, GuardedWrite, Leadership, Section};
use crate::lease_check::{
    KaOutcome, KeepAlive, LeaseLog, LeasedKey, Ns, Observation, OwnerSeen, Revoke, RevokeOutcome,
    SEC,
};
use atoll_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use atoll_proto::etcdserverpb::kv_client::KvClient;
use atoll_proto::etcdserverpb::lease_client::LeaseClient;
use atoll_proto::etcdserverpb::{
    request_op, Compare, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, PutRequest,
    RangeRequest, RequestOp, TxnRequest,
};
use atoll_proto::v3electionpb::election_client::ElectionClient;
use atoll_proto::v3electionpb::{CampaignRequest, LeaderKey, ResignRequest};
use atoll_proto::v3lockpb::lock_client::LockClient;
use atoll_proto::v3lockpb::{LockRequest, UnlockRequest};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// The run's clock.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub base: Instant,
}

impl Clock {
    pub fn now(&self) -> Ns {
        self.base.elapsed().as_nanos() as Ns
    }
    /// The instant `t` stands for.
    pub fn instant(&self, t: Ns) -> Instant {
        self.base + Duration::from_nanos(t)
    }
}

/// A call bounded by `timeout` (the gRPC deadline too); `Err` for an error or no answer.
async fn call<T, F>(timeout: Duration, f: F) -> Result<T, tonic::Status>
where
    F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded("no answer in time")),
    }
}

fn req<T>(m: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.set_timeout(timeout);
    r
}

/// A store of `nodes`, moving to the next one on [`Nodes::fail`].
struct Nodes {
    nodes: Vec<String>,
    i: usize,
}

impl Nodes {
    fn new(nodes: &[String], first: usize) -> Nodes {
        Nodes {
            nodes: nodes.to_vec(),
            i: first,
        }
    }
    fn addr(&self) -> &str {
        &self.nodes[self.i % self.nodes.len()]
    }
    fn fail(&mut self) {
        self.i += 1;
    }
    fn kv(&self) -> KvClient<Channel> {
        KvClient::new(channel(self.addr()))
    }
    fn lease(&self) -> LeaseClient<Channel> {
        LeaseClient::new(channel(self.addr()))
    }
}

/// Shared state of the lease workers.
pub struct LeaseCtl {
    pub clock: Clock,
    pub nodes: Vec<String>,
    /// The prefixes (one per region, split by the harness) the leased keys go under.
    pub prefixes: Vec<String>,
    /// Keepers stop granting, stop keeping alive (their leases lapse) and end.
    pub stop: AtomicBool,
    /// The observer and the owner poller end.
    pub stop_observing: AtomicBool,
    /// Every lease granted with a known id, recorded once its keeper is done with it.
    pub leases: Mutex<Vec<LeaseLog>>,
    /// The ids of every lease granted (for the owner poller).
    pub ids: Mutex<Vec<i64>>,
    pub observations: Mutex<Vec<Observation>>,
    pub owners: Mutex<Vec<OwnerSeen>>,
}

impl LeaseCtl {
    pub fn new(clock: Clock, nodes: Vec<String>, prefixes: Vec<String>) -> Arc<LeaseCtl> {
        Arc::new(LeaseCtl {
            clock,
            nodes,
            prefixes,
            stop: AtomicBool::new(false),
            stop_observing: AtomicBool::new(false),
            leases: Mutex::new(vec![]),
            ids: Mutex::new(vec![]),
            observations: Mutex::new(vec![]),
            owners: Mutex::new(vec![]),
        })
    }
}

/// Grants a lease through `nodes` (moving on after errors) until granted or `stop`; returns
/// the id, the granted TTL and when the grant was sent and answered.
async fn grant(
    nodes: &mut Nodes,
    ttl: i64,
    clock: Clock,
    stop: &AtomicBool,
) -> Option<(i64, i64, Ns, Ns)> {
    while !stop.load(Ordering::Relaxed) {
        let t = Duration::from_secs(3);
        let sent = clock.now();
        let r = call(
            t,
            nodes
                .lease()
                .lease_grant(req(LeaseGrantRequest { ttl, id: 0 }, t)),
        )
        .await;
        match r {
            Ok(g) if g.error.is_empty() && g.id != 0 => {
                return Some((g.id, g.ttl, sent, clock.now()));
            }
            Ok(g) => panic!("LeaseGrant answered {g:?}"),
            Err(_) => {
                nodes.fail();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    None
}

/// A KeepAlive stream to one store.
struct KaStream {
    tx: futures::channel::mpsc::UnboundedSender<LeaseKeepAliveRequest>,
    rx: tonic::Streaming<atoll_proto::etcdserverpb::LeaseKeepAliveResponse>,
}

async fn ka_stream(nodes: &Nodes) -> Result<KaStream, tonic::Status> {
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let stream = call(Duration::from_secs(2), nodes.lease().lease_keep_alive(rx)).await?;
    Ok(KaStream { tx, rx: stream })
}

/// One keep-alive of `id` on `stream` (opened on `nodes` if none): the record, and whether the
/// lease is gone (TTL 0).
async fn keep_alive_once(
    stream: &mut Option<KaStream>,
    nodes: &mut Nodes,
    id: i64,
    clock: Clock,
) -> KeepAlive {
    let node = nodes.addr().to_string();
    let mut sent = clock.now();
    let timeout = Duration::from_millis(1500);
    let r = tokio::time::timeout(timeout, async {
        if stream.is_none() {
            *stream = Some(ka_stream(nodes).await.map_err(|e| e.to_string())?);
        }
        // The send time is what the early bound counts from: taken as late as possible.
        sent = clock.now();
        let s = stream.as_mut().unwrap();
        s.tx.unbounded_send(LeaseKeepAliveRequest { id })
            .map_err(|e| e.to_string())?;
        match s.rx.message().await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err("stream ended".to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    let outcome = match r {
        Ok(Ok(r)) if r.id == id && r.ttl > 0 => KaOutcome::Renewed,
        Ok(Ok(r)) if r.id == id => KaOutcome::Expired,
        Ok(Ok(r)) => panic!("a keep-alive of {id:x} answered for {:x}", r.id),
        _ => {
            *stream = None;
            nodes.fail();
            KaOutcome::Unknown
        }
    };
    KeepAlive {
        sent,
        done: clock.now(),
        outcome,
        node,
    }
}

/// Keeps lease `id` alive every `ttl / 3` (sooner after a failure) until `until` or `stop`;
/// returns false if the lease was found gone.
async fn keep_alive_until(
    nodes: &mut Nodes,
    id: i64,
    ttl: i64,
    clock: Clock,
    until: impl Fn() -> bool,
    log: &mut Vec<KeepAlive>,
) -> bool {
    let mut stream = None;
    let period = Duration::from_millis(ttl as u64 * 1000 / 3);
    let mut next = Instant::now() + period;
    loop {
        while Instant::now() < next {
            if until() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ka = keep_alive_once(&mut stream, nodes, id, clock).await;
        let outcome = ka.outcome;
        log.push(ka);
        match outcome {
            KaOutcome::Renewed => next = Instant::now() + period,
            KaOutcome::Expired => return false,
            KaOutcome::Unknown => next = Instant::now() + Duration::from_millis(100),
        }
    }
}

/// A lease keeper (see the module doc). Key names are unique to their lease.
pub async fn lease_keeper(id: usize, ctl: Arc<LeaseCtl>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x1EA5E ^ (id as u64).wrapping_mul(0x9E37_79B9));
    let clock = ctl.clock;
    let mut nodes = Nodes::new(&ctl.nodes, rng.gen_range(0..ctl.nodes.len()));
    let name = format!("keeper{id}");
    let mut seq = 0u64;
    while !ctl.stop.load(Ordering::Relaxed) {
        seq += 1;
        nodes.i = rng.gen_range(0..ctl.nodes.len());
        let Some((lease, ttl, grant_sent, granted)) =
            grant(&mut nodes, rng.gen_range(3..=6), clock, &ctl.stop).await
        else {
            break;
        };
        ctl.ids.lock().push(lease);
        let mut log = LeaseLog {
            id: lease,
            keeper: format!("{name} lease {seq}"),
            ttl: ttl as Ns * SEC,
            grant_sent,
            granted,
            keys: vec![],
            keep_alives: vec![],
            revoke: None,
        };
        for j in 0..rng.gen_range(1..=3) {
            let p = &ctl.prefixes[rng.gen_range(0..ctl.prefixes.len())];
            let key = format!("{p}{name}-{seq}-{j}").into_bytes();
            let t = Duration::from_secs(3);
            let invoke = clock.now();
            let r = call(
                t,
                nodes.kv().put(req(
                    PutRequest {
                        key: key.clone(),
                        value: b"v".to_vec(),
                        lease,
                        ..Default::default()
                    },
                    t,
                )),
            )
            .await;
            if r.is_err() {
                nodes.fail();
            }
            log.keys.push(LeasedKey {
                key,
                invoke,
                done: clock.now(),
                acked: r.is_ok(),
            });
        }
        // Keep it alive for a while, then revoke it or let it lapse.
        let hold = Instant::now() + Duration::from_millis(rng.gen_range(1000..12_000));
        let revoke = rng.gen_bool(0.4);
        let stop = &ctl.stop;
        let alive = keep_alive_until(
            &mut nodes,
            lease,
            ttl,
            clock,
            || Instant::now() >= hold || stop.load(Ordering::Relaxed),
            &mut log.keep_alives,
        )
        .await;
        if alive && revoke && !ctl.stop.load(Ordering::Relaxed) {
            let t = Duration::from_secs(3);
            let invoke = clock.now();
            let r = call(
                t,
                nodes
                    .lease()
                    .lease_revoke(req(LeaseRevokeRequest { id: lease }, t)),
            )
            .await;
            let outcome = match r {
                Ok(_) => RevokeOutcome::Revoked,
                Err(e) if e.message().contains("lease not found") => RevokeOutcome::NotFound,
                Err(_) => {
                    nodes.fail();
                    RevokeOutcome::Unknown
                }
            };
            log.revoke = Some(Revoke {
                invoke,
                done: clock.now(),
                outcome,
            });
        }
        ctl.leases.lock().push(log);
    }
}

/// Ranges `[key, range_end)` every 100 ms until told to stop.
pub async fn lease_observer(ctl: Arc<LeaseCtl>, key: Vec<u8>, range_end: Vec<u8>) {
    let clock = ctl.clock;
    let mut nodes = Nodes::new(&ctl.nodes, 0);
    while !ctl.stop_observing.load(Ordering::Relaxed) {
        let t = Duration::from_secs(2);
        let invoke = clock.now();
        let r = call(
            t,
            nodes.kv().range(req(
                RangeRequest {
                    key: key.clone(),
                    range_end: range_end.clone(),
                    ..Default::default()
                },
                t,
            )),
        )
        .await;
        match r {
            Ok(r) => {
                let o = Observation {
                    invoke,
                    done: clock.now(),
                    revision: r.header.map_or(0, |h| h.revision),
                    present: r.kvs.into_iter().map(|kv| (kv.key, kv.lease)).collect(),
                };
                ctl.observations.lock().push(o);
            }
            Err(_) => nodes.fail(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls PD every 250 ms for the region and leader of every lease's record (`record_key`),
/// recording them when first seen and when they differ from the last poll. `stores`: store id
/// and client address.
pub async fn owner_poller(
    ctl: Arc<LeaseCtl>,
    cl: Arc<atoll_client::Client>,
    stores: Vec<(u64, String)>,
    records: (Vec<u8>, Vec<u8>),
    record_key: fn(i64) -> Vec<u8>,
) {
    let mut last: HashMap<i64, (u64, u64)> = HashMap::new();
    while !ctl.stop_observing.load(Ordering::Relaxed) {
        let seen = ctl.clock.now();
        if let Ok(Ok(regions)) = tokio::time::timeout(
            Duration::from_secs(2),
            cl.pd().scan_regions(&records.0, &records.1, 0),
        )
        .await
        {
            let ids = ctl.ids.lock().clone();
            let mut changes = vec![];
            for id in ids {
                let k = record_key(id);
                let Some(r) = regions.iter().find(|r| {
                    k >= r.region.start_key && (r.region.end_key.is_empty() || k < r.region.end_key)
                }) else {
                    continue;
                };
                let Some(leader) = r.leader.as_ref() else {
                    continue;
                };
                let now = (r.region.id, leader.store_id);
                if last.insert(id, now) != Some(now) {
                    let owner = stores
                        .iter()
                        .find(|(s, _)| *s == leader.store_id)
                        .map_or_else(|| format!("store {}", leader.store_id), |(_, a)| a.clone());
                    changes.push(OwnerSeen {
                        lease: id,
                        seen,
                        region: r.region.id,
                        owner,
                    });
                }
            }
            ctl.owners.lock().extend(changes);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---- elections and locks ----

/// Shared state of the election and lock workers.
pub struct FenceCtl {
    pub clock: Clock,
    pub nodes: Vec<String>,
    pub stop: AtomicBool,
    pub leaderships: Mutex<Vec<Leadership>>,
    pub writes: Mutex<Vec<GuardedWrite>>,
    pub sections: Mutex<Vec<Section>>,
    /// Calls that failed for good reasons (counted for the report): name -> count.
    pub counts: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl FenceCtl {
    pub fn new(clock: Clock, nodes: Vec<String>) -> Arc<FenceCtl> {
        Arc::new(FenceCtl {
            clock,
            nodes,
            stop: AtomicBool::new(false),
            leaderships: Mutex::new(vec![]),
            writes: Mutex::new(vec![]),
            sections: Mutex::new(vec![]),
            counts: Mutex::new(Default::default()),
        })
    }
    fn count(&self, what: &str) {
        *self.counts.lock().entry(what.to_string()).or_default() += 1;
    }
}

/// A lease kept alive in the background until `let_go` is set (then left to lapse).
struct HeldLease {
    id: i64,
    let_go: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl HeldLease {
    async fn grant(nodes: &mut Nodes, ttl: i64, clock: Clock, stop: &AtomicBool) -> Option<Self> {
        let (id, ttl, _, _) = grant(nodes, ttl, clock, stop).await?;
        let let_go = Arc::new(AtomicBool::new(false));
        let (go, mut n) = (let_go.clone(), Nodes::new(&nodes.nodes, nodes.i));
        let task = tokio::spawn(async move {
            let mut log = vec![];
            keep_alive_until(
                &mut n,
                id,
                ttl,
                clock,
                || go.load(Ordering::Relaxed),
                &mut log,
            )
            .await;
        });
        Some(HeldLease { id, let_go, task })
    }
    /// Stops keeping it alive; with `revoke`, also revokes it (best effort).
    async fn release(self, nodes: &mut Nodes, revoke: bool) {
        self.let_go.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        if revoke {
            let t = Duration::from_secs(2);
            let r = call(
                t,
                nodes
                    .lease()
                    .lease_revoke(req(LeaseRevokeRequest { id: self.id }, t)),
            )
            .await;
            if r.is_err() {
                nodes.fail();
            }
        }
    }
}

/// A Txn `if create_revision(key) == fence then put(put_key, value)`.
async fn guarded_put(
    nodes: &mut Nodes,
    key: &[u8],
    fence: i64,
    put_key: Vec<u8>,
    value: Vec<u8>,
) -> GuardOutcome {
    let t = Duration::from_secs(3);
    let txn = TxnRequest {
        compare: vec![Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Create as i32,
            key: key.to_vec(),
            range_end: vec![],
            target_union: Some(TargetUnion::CreateRevision(fence)),
        }],
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: put_key,
                value,
                ..Default::default()
            })),
        }],
        failure: vec![],
    };
    match call(t, nodes.kv().txn(req(txn, t))).await {
        Ok(r) if r.succeeded => GuardOutcome::Wrote(r.header.map_or(0, |h| h.revision)),
        Ok(_) => GuardOutcome::Refused,
        Err(_) => {
            nodes.fail();
            GuardOutcome::Unknown
        }
    }
}

/// An election candidate (see the module doc). Its log records go under `log_prefix`.
pub async fn candidate(
    id: usize,
    ctl: Arc<FenceCtl>,
    name: Vec<u8>,
    log_prefix: String,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xE1EC7 ^ (id as u64).wrapping_mul(0x9E37_79B9));
    let clock = ctl.clock;
    let actor = format!("candidate{id}");
    let mut nodes = Nodes::new(&ctl.nodes, rng.gen_range(0..ctl.nodes.len()));
    let mut term = 0u64;
    let mut seq = 0u64;
    while !ctl.stop.load(Ordering::Relaxed) {
        let Some(lease) =
            HeldLease::grant(&mut nodes, rng.gen_range(3..=5), clock, &ctl.stop).await
        else {
            break;
        };
        // Campaign until elected (it blocks while another leads), on one store at a time.
        let mut won: Option<(Ns, Ns, LeaderKey)> = None;
        while won.is_none() && !ctl.stop.load(Ordering::Relaxed) {
            // Short: the harness waits for it when it stops the workers. A Campaign given up
            // on deletes its key (the service's clean-up); the next one makes it again.
            let t = Duration::from_secs(4);
            let sent = clock.now();
            let r = call(
                t,
                ElectionClient::new(channel(nodes.addr())).campaign(req(
                    CampaignRequest {
                        name: name.clone(),
                        lease: lease.id,
                        value: format!("{actor}/{term}").into_bytes(),
                    },
                    t,
                )),
            )
            .await;
            match r {
                Ok(r) => {
                    let Some(l) = r.leader else {
                        panic!("Campaign answered no leader key")
                    };
                    won = Some((sent, clock.now(), l));
                }
                Err(e) => {
                    if e.code() == tonic::Code::Unimplemented {
                        panic!("Campaign: {e}");
                    }
                    ctl.count("campaign error");
                    nodes.fail();
                    if lease_lost(&e) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let Some((campaign_sent, won_at, leader)) = won else {
            lease.release(&mut nodes, false).await;
            continue;
        };
        term += 1;
        // Lead for 0.5-3 s: a guarded log record every 100-300 ms, whether the lease is still
        // alive or not (fencing must refuse the writes of a leader that lost its key). One in
        // four lets its lease go at once and goes on writing for up to 7 s: past its TTL its
        // key is gone, another leads, and its writes must be refused.
        let lapse = rng.gen_bool(0.25);
        let hold = if lapse { 500..7000 } else { 500..3000 };
        let until = Instant::now() + Duration::from_millis(rng.gen_range(hold));
        if lapse {
            // Let the lease go now: the leadership ends some time before `until`.
            lease.let_go.store(true, Ordering::Relaxed);
        }
        let mut ended = won_at;
        while Instant::now() < until && !ctl.stop.load(Ordering::Relaxed) {
            seq += 1;
            let invoke = clock.now();
            let outcome = guarded_put(
                &mut nodes,
                &leader.key,
                leader.rev,
                format!("{log_prefix}{actor}/{seq:06}").into_bytes(),
                format!("{actor} term {term} fence {}", leader.rev).into_bytes(),
            )
            .await;
            let done = clock.now();
            ended = done;
            ctl.writes.lock().push(GuardedWrite {
                actor: actor.clone(),
                term,
                fence: leader.rev,
                invoke,
                done,
                outcome,
            });
            tokio::time::sleep(Duration::from_millis(rng.gen_range(100..300))).await;
        }
        let how = if lapse {
            lease.release(&mut nodes, false).await;
            "lease let go"
        } else if rng.gen_bool(0.6) {
            let t = Duration::from_secs(3);
            let r = call(
                t,
                ElectionClient::new(channel(nodes.addr())).resign(req(
                    ResignRequest {
                        leader: Some(leader.clone()),
                    },
                    t,
                )),
            )
            .await;
            if r.is_err() {
                ctl.count("resign error");
                nodes.fail();
            }
            lease.release(&mut nodes, false).await;
            "resigned"
        } else {
            lease.release(&mut nodes, true).await;
            "lease revoked"
        };
        ctl.leaderships.lock().push(Leadership {
            actor: actor.clone(),
            term,
            key: leader.key.clone(),
            fence: leader.rev,
            campaign_sent,
            won: won_at,
            ended,
            how: how.into(),
        });
    }
}

fn lease_lost(e: &tonic::Status) -> bool {
    e.message().contains("lease not found")
}

/// A lock worker (see the module doc): the counter is `counter`, a decimal number.
pub async fn lock_worker(
    id: usize,
    ctl: Arc<FenceCtl>,
    name: Vec<u8>,
    counter: Vec<u8>,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x10C6 ^ (id as u64).wrapping_mul(0x9E37_79B9));
    let clock = ctl.clock;
    let actor = format!("locker{id}");
    let mut nodes = Nodes::new(&ctl.nodes, rng.gen_range(0..ctl.nodes.len()));
    let mut term = 0u64;
    while !ctl.stop.load(Ordering::Relaxed) {
        let Some(lease) =
            HeldLease::grant(&mut nodes, rng.gen_range(3..=5), clock, &ctl.stop).await
        else {
            break;
        };
        let t = Duration::from_secs(4);
        let lock_sent = clock.now();
        let r = call(
            t,
            LockClient::new(channel(nodes.addr())).lock(req(
                LockRequest {
                    name: name.clone(),
                    lease: lease.id,
                },
                t,
            )),
        )
        .await;
        let key = match r {
            Ok(r) => r.key,
            Err(e) => {
                if e.code() == tonic::Code::Unimplemented {
                    panic!("Lock: {e}");
                }
                ctl.count("lock error");
                nodes.fail();
                lease.release(&mut nodes, true).await;
                continue;
            }
        };
        let entered = clock.now();
        term += 1;
        // The fence: the lock key's create_revision; then the counter.
        let rt = Duration::from_secs(3);
        let read = |k: Vec<u8>, nodes: &Nodes| {
            let mut kv = nodes.kv();
            async move {
                call(
                    rt,
                    kv.range(req(
                        RangeRequest {
                            key: k,
                            ..Default::default()
                        },
                        rt,
                    )),
                )
                .await
            }
        };
        let fence = match read(key.clone(), &nodes).await {
            Ok(r) => r.kvs.first().map(|kv| kv.create_revision),
            Err(_) => {
                nodes.fail();
                None
            }
        };
        let value = match read(counter.clone(), &nodes).await {
            Ok(r) => Some(r.kvs.first().map_or(0, |kv| {
                String::from_utf8_lossy(&kv.value)
                    .parse::<i64>()
                    .expect("a counter value")
            })),
            Err(_) => {
                nodes.fail();
                None
            }
        };
        if let (Some(fence), Some(value)) = (fence, value) {
            let mut pause = Duration::from_millis(rng.gen_range(0..200));
            if rng.gen_bool(0.03) {
                // Now and then hold it across a lapse of the lease (TTL 3-5 s): the lock passes
                // to another worker, and this write must be refused.
                lease.let_go.store(true, Ordering::Relaxed);
                pause = Duration::from_millis(6000);
            }
            tokio::time::sleep(pause).await;
            let invoke = clock.now();
            let outcome = guarded_put(
                &mut nodes,
                &key,
                fence,
                counter.clone(),
                (value + 1).to_string().into_bytes(),
            )
            .await;
            let done = clock.now();
            ctl.sections.lock().push(Section {
                key: key.clone(),
                lock_sent,
                entered,
                exited: done,
                read: value,
                write: GuardedWrite {
                    actor: actor.clone(),
                    term,
                    fence,
                    invoke,
                    done,
                    outcome,
                },
            });
        } else {
            ctl.count(if fence.is_none() {
                "lock key gone before the section"
            } else {
                "counter read failed"
            });
        }
        let t = Duration::from_secs(3);
        let r = call(
            t,
            LockClient::new(channel(nodes.addr())).unlock(req(UnlockRequest { key }, t)),
        )
        .await;
        if r.is_err() {
            ctl.count("unlock error");
            nodes.fail();
        }
        lease.release(&mut nodes, rng.gen_bool(0.5)).await;
    }
}

/// The counter's value (absent = 0), read through any of `nodes` within `timeout`.
pub async fn read_counter(nodes: &[String], counter: &[u8], timeout: Duration) -> Option<i64> {
    let deadline = Instant::now() + timeout;
    let mut n = Nodes::new(nodes, 0);
    while Instant::now() < deadline {
        let t = Duration::from_secs(3);
        let r = call(
            t,
            n.kv().range(req(
                RangeRequest {
                    key: counter.to_vec(),
                    ..Default::default()
                },
                t,
            )),
        )
        .await;
        match r {
            Ok(r) => {
                return Some(r.kvs.first().map_or(0, |kv| {
                    String::from_utf8_lossy(&kv.value).parse().expect("counter")
                }))
            }
            Err(_) => n.fail(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// How long to wait: until `t` on `clock` (now if past).
pub fn until(clock: Clock, t: Ns) -> Duration {
    clock.instant(t).saturating_duration_since(Instant::now())
}
