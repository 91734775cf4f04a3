//! The chaos suite: a nemesis kills (`kill -9`) and restarts storage nodes and PD members,
//! cuts a store off from the others (transport failpoints set at run time; one variant picks
//! the store leading the most regions and freezes it for a moment, so that it wakes a deposed
//! leader that does not know it yet), and pauses
//! processes (SIGSTOP / SIGCONT), while clients run gets, puts, deletes, compare-and-swaps and
//! read-modify-write transactions on a set of keys. Every operation is recorded with its
//! invoke and completion times and its result (or "unknown"), and the history is checked for
//! linearizability per key (`atoll_tests::linearizability`), then extended with a final read
//! of every key after the faults healed, which finds lost acknowledged writes.
//!
//! - `chaos_bounded`: part of the normal test command (`ATOLL_CHAOS_SECS`, default 60 s of
//!   faults; the whole test stays under 5 minutes).
//! - `chaos_long`: `ATOLL_CHAOS_LONG=1` (10 minutes, or `ATOLL_CHAOS_SECS`).
//! - `chaos_checker_catches_stale_follower_reads`: the same harness against a deliberately
//!   broken read path (reads served by any peer without ReadIndex, `--allow-unsafe-local-read`
//!   plus the client's `unsafe_follower_read`): the checker must report violations.
//!
//! The first two also run etcd's API under the same faults: etcd writers put, delete and write
//! multi-key txns under three prefixes (`watch/a/`, `watch/b/`, `watch/c/`, split into regions
//! before the run and split further during it), recording each write's revision (or its
//! unknown outcome), while six etcd watchers watch those prefixes, a range across two of them
//! and a from-key range, through any store: on an error, a cancel or a store that stops
//! answering progress requests they resume on another store at "last revision seen + 1". Some
//! ask for `prev_kv`, some for progress notifications (`progress_notify`, `progress_request`);
//! one starts "now". Once the faults heal and the writers stop, every watcher asks for progress
//! until a progress notification reaches the largest acknowledged revision, and the watch
//! checker (`atoll_tests::watch_check`) checks every recorded stream: every acknowledged write
//! in a watcher's range delivered exactly once, in order, one revision per response, no event
//! that no write made, progress notifications, `prev_kv`, `create_revision` and `version`.
//!
//! They run etcd leases under the same faults too (`atoll_tests::etcd_lease`): keepers grant
//! leases, put keys with them under `lease/`, keep them alive and revoke them or let them lapse;
//! an observer ranges over `lease/`, a watcher records its deletes, a poller records PD's view
//! of each lease record's owner. Once the nemesis stops the keepers let every lease go, the
//! observer goes on until each is past its late limit, and the lease checker
//! (`atoll_tests::lease_check`) judges early and missed expiries, revokes and atomic deletes.
//! Election candidates and lock workers (`FENCERS` of each) run as well: each with a lease of
//! its own, writing only through Txns guarded by its key's `create_revision` (the fence),
//! judged by `atoll_tests::fence_check` (no two leaders, no overlapping locks, no lost update).

use atoll_client::{Client, ClientConfig, Error};
use atoll_tests::etcd_lease::{self, Clock, FenceCtl, LeaseCtl};
use atoll_tests::etcd_watch::{self, WatchCtl, WatchSpec};
use atoll_tests::fence_check::{self, ElectionHistory, LockHistory};
use atoll_tests::lease_check::{self, FaultWindow, LeaseHistory, WatchedDelete, MS, SEC};
use atoll_tests::linearizability::{
    check_with_final_values, CheckOptions, OpKind, Operation, Outcome,
};
use atoll_tests::procs::{http, ClusterOpts, ProcCluster};
use atoll_tests::watch_check::{
    self, prefix_end, EventKind, WatcherLog, Write as EtcdWrite, WriteOp,
};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One test at a time: each runs a 3 PD + 3 store cluster that wants the machine's cores.
static SERIAL: Mutex<()> = Mutex::new(());

struct Recorder {
    base: Instant,
    ops: Mutex<Vec<Operation>>,
}

impl Recorder {
    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
    fn record(&self, client: u64, key: &str, kind: OpKind, invoke_ns: u64, outcome: Outcome) {
        let complete_ns = self.now();
        self.ops.lock().push(Operation {
            client,
            key: key.to_string(),
            kind,
            invoke_ns,
            complete_ns,
            outcome,
        });
    }
}

fn s(v: Option<Vec<u8>>) -> Option<String> {
    v.map(|v| String::from_utf8(v).expect("utf8 value"))
}

/// A write's outcome when the client returned an error: it may or may not have happened,
/// except where the error proves it did not.
fn write_error(e: &Error) -> Outcome {
    match e {
        Error::InvalidArgument(m) => panic!("client rejected a valid request: {m}"),
        Error::WriteConflict { .. } => Outcome::Failed,
        _ => Outcome::Unknown,
    }
}

struct Workload {
    keys: Vec<String>,
    rec: Recorder,
    stop: AtomicBool,
    seq: AtomicU64,
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

impl Workload {
    fn count(&self, what: &'static str) {
        *self.counts.lock().entry(what).or_default() += 1;
    }
}

async fn client_loop(id: u64, cl: Arc<Client>, w: Arc<Workload>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    // The last value this client saw per key: what its compare-and-swaps expect.
    let mut seen: HashMap<String, Option<String>> = HashMap::new();
    while !w.stop.load(Ordering::Relaxed) {
        let key = w.keys[rng.gen_range(0..w.keys.len())].clone();
        let fresh = format!("c{id}-{}", w.seq.fetch_add(1, Ordering::Relaxed));
        let r = rng.gen_range(0..100);
        let t0 = w.rec.now();
        if r < 40 {
            w.count("get");
            match cl.get(key.as_bytes()).await {
                Ok(v) => {
                    let v = s(v);
                    seen.insert(key.clone(), v.clone());
                    w.rec.record(id, &key, OpKind::Get, t0, Outcome::GetOk(v));
                }
                Err(e) => {
                    if let Error::InvalidArgument(m) = e {
                        panic!("client rejected a valid get: {m}");
                    }
                }
            }
        } else if r < 65 {
            w.count("put");
            let out = match cl.put(key.as_bytes(), fresh.as_bytes()).await {
                Ok(_) => Outcome::PutOk,
                Err(e) => write_error(&e),
            };
            w.rec.record(id, &key, OpKind::Put(fresh.clone()), t0, out);
        } else if r < 85 {
            w.count("cas");
            let expected = seen.get(&key).cloned().unwrap_or(None);
            let res = cl
                .compare_and_swap(
                    key.as_bytes(),
                    expected.as_deref().map(str::as_bytes),
                    Some(fresh.as_bytes()),
                )
                .await;
            let out = match res {
                Ok((true, _)) => {
                    seen.insert(key.clone(), Some(fresh.clone()));
                    Outcome::CasOk(true)
                }
                // Not swapped: the answer is also a read of the value it compared against.
                Ok((false, cur)) => {
                    let cur = s(cur);
                    seen.insert(key.clone(), cur.clone());
                    Outcome::CasFailed(cur)
                }
                Err(e) => write_error(&e),
            };
            let kind = OpKind::Cas {
                expected,
                new: Some(fresh.clone()),
            };
            w.rec.record(id, &key, kind, t0, out);
        } else if r < 90 {
            w.count("delete");
            let out = match cl.delete(key.as_bytes()).await {
                Ok(_) => Outcome::DeleteOk,
                Err(e) => write_error(&e),
            };
            w.rec.record(id, &key, OpKind::Delete, t0, out);
        } else {
            // A read-modify-write transaction: under snapshot isolation with write-conflict
            // detection, a committed one is a compare-and-swap from the value it read (no
            // other write to the key committed between its start and commit timestamps).
            w.count("txn");
            let Ok(mut t) = cl.begin().await else {
                continue;
            };
            let Ok(read) = t.get(key.as_bytes()).await else {
                continue;
            };
            let read = s(read);
            if t.put(key.clone().into_bytes(), fresh.clone().into_bytes())
                .is_err()
            {
                continue;
            }
            let out = match t.commit().await {
                Ok(_) => Outcome::CasOk(true),
                Err(e) => write_error(&e),
            };
            let kind = OpKind::Cas {
                expected: read,
                new: Some(fresh.clone()),
            };
            w.rec.record(id, &key, kind, t0, out);
        }
    }
}

/// The keys the etcd writers write and the watchers watch: 16 under each prefix.
const WATCH_PREFIXES: [&str; 3] = ["watch/a/", "watch/b/", "watch/c/"];
const WATCH_KEYS_PER_PREFIX: usize = 16;

fn watch_key(prefix: usize, i: usize) -> String {
    format!("{}k{i:02}", WATCH_PREFIXES[prefix])
}

/// Split before the run: each prefix in two regions, the prefixes apart.
fn watch_splits() -> Vec<String> {
    let mut v = vec!["watch/".to_string()];
    for (p, prefix) in WATCH_PREFIXES.iter().enumerate() {
        if p > 0 {
            v.push(prefix.to_string());
        }
        v.push(watch_key(p, WATCH_KEYS_PER_PREFIX / 2));
    }
    v
}

/// An etcd writer: puts (half), deletes, and txns of 2 or 3 keys under different prefixes
/// (so in different regions), one of them sometimes a delete; each value is unique.
async fn etcd_writer(
    id: usize,
    nodes: Vec<String>,
    stop: Arc<AtomicBool>,
    out: Arc<Mutex<Vec<EtcdWrite>>>,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xE7CD ^ (id as u64).wrapping_mul(0x9E37_79B9));
    let mut node = id;
    let mut kv = etcd_watch::kv_client(&nodes[node % nodes.len()]);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let value = format!("e{id}-{seq}");
        let key =
            |rng: &mut StdRng, p: usize| watch_key(p, rng.gen_range(0..WATCH_KEYS_PER_PREFIX));
        let r = rng.gen_range(0..100);
        let ops = if r < 50 {
            let p = rng.gen_range(0..WATCH_PREFIXES.len());
            vec![WriteOp::put(key(&mut rng, p), value)]
        } else if r < 65 {
            let p = rng.gen_range(0..WATCH_PREFIXES.len());
            vec![WriteOp::delete(key(&mut rng, p))]
        } else {
            let n = rng.gen_range(2..=3);
            let first = rng.gen_range(0..WATCH_PREFIXES.len());
            let mut ops: Vec<WriteOp> = (0..n)
                .map(|j| {
                    let k = key(&mut rng, (first + j) % WATCH_PREFIXES.len());
                    WriteOp::put(k, format!("{value}.{j}"))
                })
                .collect();
            if rng.gen_bool(0.25) {
                let k = ops[n - 1].key().to_vec();
                ops[n - 1] = WriteOp::delete(k);
            }
            ops
        };
        let w = etcd_watch::write(&mut kv, &ops, Duration::from_secs(5)).await;
        if w.outcome == watch_check::WriteOutcome::Unknown {
            node += 1;
            kv = etcd_watch::kv_client(&nodes[node % nodes.len()]);
        }
        out.lock().push(w);
    }
}

/// The leased keys go under these (each its own region).
const LEASE_PREFIXES: [&str; 3] = ["lease/a/", "lease/b/", "lease/c/"];

fn lease_splits() -> Vec<String> {
    let mut v: Vec<String> = LEASE_PREFIXES.iter().map(|p| p.to_string()).collect();
    v.push("lease0".into());
    v
}

/// The election, its leaders' log, the lock and its counter: split so that every guarded
/// write (a compare on the leader's or holder's key, a put of another key) spans two regions.
const ELECTION: &[u8] = b"fence/elect";
const ELECTION_LOG: &str = "fence/elect-log/";
const LOCK: &[u8] = b"fence/lock";
const COUNTER: &[u8] = b"fence/counter";
const FENCE_SPLITS: [&str; 5] = [
    "fence/",
    "fence/elect-log/",
    "fence/elect/",
    "fence/lock/",
    "fence0",
];

/// The recorded watchers: prefixes spanning several regions, a range across two prefixes, a
/// from-key range; with and without `prev_kv` and progress requests; one starting "now".
fn watch_specs(history_start: i64) -> Vec<WatchSpec> {
    let prefix = |name: &str, p: &str| WatchSpec {
        name: name.into(),
        key: p.as_bytes().to_vec(),
        range_end: prefix_end(p.as_bytes()),
        start_revision: history_start + 1,
        ..Default::default()
    };
    let ms = Duration::from_millis;
    vec![
        WatchSpec {
            request_progress: Some(ms(1000)),
            ..prefix("all", "watch/")
        },
        WatchSpec {
            prev_kv: true,
            ..prefix("a-prev-kv", WATCH_PREFIXES[0])
        },
        WatchSpec {
            progress_notify: true,
            request_progress: Some(ms(2000)),
            ..prefix("b-notify", WATCH_PREFIXES[1])
        },
        WatchSpec {
            name: "a8-c8-prev-kv".into(),
            key: watch_key(0, 8).into_bytes(),
            range_end: watch_key(2, 8).into_bytes(),
            prev_kv: true,
            request_progress: Some(ms(1000)),
            ..prefix("", "")
        },
        WatchSpec {
            start_revision: 0,
            ..prefix("c-now", WATCH_PREFIXES[2])
        },
        WatchSpec {
            name: "from-b8".into(),
            key: watch_key(1, 8).into_bytes(),
            range_end: vec![0],
            prev_kv: true,
            request_progress: Some(ms(3000)),
            ..prefix("", "")
        },
    ]
}

/// Splits regions under the watched prefixes at random keys while the nemesis runs.
fn splitter(pd: String, stop: Arc<AtomicBool>, splits: Arc<AtomicU64>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5_0117);
    while !stop.load(Ordering::Relaxed) {
        // Pace: one split every 3 to 7 seconds (checking the stop flag meanwhile).
        let until = Instant::now() + Duration::from_millis(rng.gen_range(3000..7000));
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let key = watch_key(
            rng.gen_range(0..WATCH_PREFIXES.len()),
            rng.gen_range(1..WATCH_KEYS_PER_PREFIX),
        );
        let out = atoll_tests::procs::kvctl(&pd, &["--timeout", "5", "split", &key]);
        if out.status.success() {
            eprintln!("splitter: split at {key}");
            splits.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A recorded watcher's log and its task (which ends with the revision it caught up to).
type RecordedWatcher = (
    Arc<Mutex<WatcherLog>>,
    tokio::task::JoinHandle<Result<i64, String>>,
);

/// What the etcd writers and watchers of a run found.
struct WatchResult {
    report: watch_check::Report,
    /// Watchers that never caught up, with why.
    stalled: Vec<String>,
    splits: u64,
    target: i64,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillStore(usize),
    KillPd(usize),
    PartitionStore(usize),
    /// The store leading the most regions, cut off and frozen for a moment: once thawed it
    /// still believes it leads (no quorum check yet) while the others elect and write, and
    /// clients with a stale region cache send it their requests.
    IsolateLeader(usize),
    PauseStore(usize),
    PausePd(usize),
}

struct Nemesis<'a> {
    c: &'a mut ProcCluster,
    rng: StdRng,
    injected: BTreeMap<String, u64>,
    clock: Clock,
    /// Every fault, from injection to heal (for the lease checker).
    windows: Vec<FaultWindow>,
}

impl Nemesis<'_> {
    fn pd_leader(&self) -> Option<usize> {
        let out = self
            .c
            .kvctl(&["--output", "json", "--timeout", "3", "members"]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let addr = v["members"]
            .as_array()?
            .iter()
            .find(|m| m["is_leader"] == true)?["client_addr"]
            .as_str()?
            .to_string();
        self.c.pds.iter().position(|p| p.client_addr == addr)
    }

    /// The store that leads the most regions, as PD reports them.
    fn leading_store(&self) -> Option<usize> {
        let out = self
            .c
            .kvctl(&["--output", "json", "--timeout", "3", "regions"]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let mut led: BTreeMap<u64, usize> = BTreeMap::new();
        for r in v["regions"].as_array()? {
            if let Some(s) = r["leader"]["store_id"].as_u64() {
                *led.entry(s).or_default() += 1;
            }
        }
        let (&id, _) = led.iter().max_by_key(|(_, n)| **n)?;
        self.c.store_index_of(id)
    }

    fn pick(&mut self) -> Fault {
        let store = self.rng.gen_range(0..self.c.stores.len());
        let pd = if self.rng.gen_bool(0.7) {
            self.pd_leader()
                .unwrap_or_else(|| self.rng.gen_range(0..self.c.pds.len()))
        } else {
            self.rng.gen_range(0..self.c.pds.len())
        };
        match self.rng.gen_range(0..100) {
            0..=24 => Fault::KillStore(store),
            25..=37 => Fault::KillPd(pd),
            38..=54 => Fault::PartitionStore(store),
            55..=69 => Fault::IsolateLeader(self.leading_store().unwrap_or(store)),
            70..=87 => Fault::PauseStore(store),
            _ => Fault::PausePd(pd),
        }
    }

    fn set_partition(&self, i: usize, on: bool) {
        let addr = &self.c.stores[i].status_addr;
        for fp in ["transport::send_drop", "transport::recv_drop"] {
            let path = format!("/fail/{fp}");
            let r = if on {
                http(addr, "PUT", &path, "return")
            } else {
                http(addr, "DELETE", &path, "")
            };
            if let Err(e) = r {
                eprintln!("nemesis: failpoint {fp} on store {i}: {e}");
            }
        }
    }

    /// Injects `f`, holds it for `hold`, heals it.
    fn run(&mut self, f: Fault, hold: Duration) {
        let inject = self.clock.now();
        self.inject(f, hold);
        let store = match f {
            Fault::KillStore(i)
            | Fault::PartitionStore(i)
            | Fault::IsolateLeader(i)
            | Fault::PauseStore(i) => Some(self.c.stores[i].addr.clone()),
            Fault::KillPd(_) | Fault::PausePd(_) => None,
        };
        self.windows.push(FaultWindow {
            inject,
            heal: self.clock.now(),
            what: format!("{f:?}"),
            store,
        });
    }

    fn inject(&mut self, f: Fault, hold: Duration) {
        eprintln!("nemesis: {f:?} for {hold:?}");
        *self
            .injected
            .entry(format!("{f:?}").split('(').next().unwrap().to_string())
            .or_default() += 1;
        match f {
            Fault::KillStore(i) => {
                self.c.stores[i].proc_.kill();
                std::thread::sleep(hold);
                self.c.stores[i].proc_.start();
            }
            Fault::KillPd(i) => {
                self.c.pds[i].proc_.kill();
                std::thread::sleep(hold);
                self.c.pds[i].proc_.start();
            }
            Fault::PartitionStore(i) => {
                self.set_partition(i, true);
                std::thread::sleep(hold);
                self.set_partition(i, false);
            }
            Fault::IsolateLeader(i) => {
                self.set_partition(i, true);
                let frozen = hold.min(Duration::from_millis(1500));
                self.c.stores[i].proc_.signal(libc::SIGSTOP);
                std::thread::sleep(frozen);
                self.c.stores[i].proc_.signal(libc::SIGCONT);
                std::thread::sleep(hold - frozen);
                self.set_partition(i, false);
            }
            Fault::PauseStore(i) => {
                self.c.stores[i].proc_.signal(libc::SIGSTOP);
                std::thread::sleep(hold);
                self.c.stores[i].proc_.signal(libc::SIGCONT);
            }
            Fault::PausePd(i) => {
                self.c.pds[i].proc_.signal(libc::SIGSTOP);
                std::thread::sleep(hold);
                self.c.pds[i].proc_.signal(libc::SIGCONT);
            }
        }
    }
}

struct ChaosOpts {
    secs: u64,
    clients: u64,
    keys: usize,
    /// The deliberately broken build: stale reads from followers.
    broken_reads: bool,
    /// etcd writers and watchers beside the clients, checked with the watch checker.
    watch: bool,
    /// etcd lease keepers (this many), an observer and a watcher, checked with the lease
    /// checker.
    keepers: usize,
    /// Election candidates and lock workers (this many of each), checked with the fence
    /// checkers.
    fencers: usize,
}

struct ChaosResult {
    ops: usize,
    unknown: usize,
    violations: Vec<String>,
    inconclusive: usize,
    lost: Vec<String>,
    injected: BTreeMap<String, u64>,
    counts: BTreeMap<&'static str, u64>,
    watch: Option<WatchResult>,
    lease: Option<LeaseResult>,
    fence: Option<FenceResult>,
}

fn run_chaos(o: ChaosOpts) -> ChaosResult {
    let seed = atoll_tests::seed();
    let mut store_args = vec![];
    if o.broken_reads {
        store_args.push("--allow-unsafe-local-read".to_string());
    }
    let mut c = ProcCluster::start(ClusterOpts {
        pds: 3,
        stores: 3,
        store_args,
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(90));
    let mut split: Vec<String> = (1..4)
        .map(|i| format!("chaos/k{:03}", i * o.keys / 4))
        .collect();
    if o.watch {
        split.extend(watch_splits());
    }
    if o.keepers > 0 {
        split.extend(lease_splits());
    }
    if o.fencers > 0 {
        split.extend(FENCE_SPLITS.iter().map(|k| k.to_string()));
    }
    let mut args = vec!["split"];
    args.extend(split.iter().map(String::as_str));
    let out = c.kvctl(&args);
    assert!(
        out.status.success(),
        "split: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pd = atoll_pd_client::rpc::parse_endpoints(&c.pd_endpoints());
    let mut cfg = ClientConfig::new(pd.clone());
    cfg.timeout = Duration::from_secs(6);
    cfg.rpc_timeout = Duration::from_secs(2);
    cfg.unsafe_follower_read = o.broken_reads;
    let cl = rt.block_on(Client::connect(cfg)).expect("client");
    let w = Arc::new(Workload {
        keys: (0..o.keys).map(|i| format!("chaos/k{i:03}")).collect(),
        rec: Recorder {
            base: Instant::now(),
            ops: Mutex::new(vec![]),
        },
        stop: AtomicBool::new(false),
        seq: AtomicU64::new(0),
        counts: Mutex::new(BTreeMap::new()),
    });
    // etcd writers and watchers, through the stores' client ports.
    let nodes: Vec<String> = c.stores.iter().map(|s| s.addr.clone()).collect();
    let wctl = WatchCtl::new(Duration::from_secs(8));
    let etcd_stop = Arc::new(AtomicBool::new(false));
    let etcd_writes: Arc<Mutex<Vec<EtcdWrite>>> = Arc::new(Mutex::new(vec![]));
    let splits = Arc::new(AtomicU64::new(0));
    let mut watchers = vec![];
    let mut writers = vec![];
    let mut split_thread = None;
    let mut history_start = 0;
    if o.watch {
        // The revision before any etcd write: the watchers start right after it.
        history_start = rt.block_on(async {
            for i in 0..30 {
                match etcd_watch::current_revision(&nodes[i % nodes.len()], b"watch/").await {
                    Ok(r) => return r,
                    Err(e) => eprintln!("current revision from {}: {e}", nodes[i % nodes.len()]),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            panic!("no store answered a Range");
        });
        for (i, spec) in watch_specs(history_start).into_iter().enumerate() {
            let log = Arc::new(Mutex::new(spec.log()));
            let h = rt.spawn(etcd_watch::run_watcher(
                spec,
                nodes.clone(),
                i,
                wctl.clone(),
                log.clone(),
            ));
            watchers.push((log, h));
        }
        for id in 0..3 {
            writers.push(rt.spawn(etcd_writer(
                id,
                nodes.clone(),
                etcd_stop.clone(),
                etcd_writes.clone(),
                seed,
            )));
        }
        let (pd, stop, n) = (c.pd_endpoints(), etcd_stop.clone(), splits.clone());
        split_thread = Some(std::thread::spawn(move || splitter(pd, stop, n, seed)));
    }
    // etcd leases: keepers, an observer, a watcher of the leased keys' deletes, PD's view of
    // the lease records' owners; elections and locks.
    let clock = Clock {
        base: Instant::now(),
    };
    let lctl = LeaseCtl::new(
        clock,
        nodes.clone(),
        LEASE_PREFIXES.iter().map(|p| p.to_string()).collect(),
    );
    let lwctl = WatchCtl::with_base(Duration::from_secs(8), clock.base);
    let mut keepers = vec![];
    let mut lease_observers = vec![];
    let mut lease_watcher = None;
    if o.keepers > 0 {
        let start = rt.block_on(async {
            for i in 0..30 {
                if let Ok(r) =
                    etcd_watch::current_revision(&nodes[i % nodes.len()], b"lease/").await
                {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            panic!("no store answered a Range");
        });
        let spec = WatchSpec {
            name: "lease-deletes".into(),
            key: b"lease/".to_vec(),
            range_end: prefix_end(b"lease/"),
            start_revision: start + 1,
            request_progress: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        let log = Arc::new(Mutex::new(spec.log()));
        let h = rt.spawn(etcd_watch::run_watcher(
            spec,
            nodes.clone(),
            1,
            lwctl.clone(),
            log.clone(),
        ));
        lease_watcher = Some((log, h));
        for id in 0..o.keepers {
            keepers.push(rt.spawn(etcd_lease::lease_keeper(id, lctl.clone(), seed)));
        }
        lease_observers.push(rt.spawn(etcd_lease::lease_observer(
            lctl.clone(),
            b"lease/".to_vec(),
            prefix_end(b"lease/"),
        )));
        let stores: Vec<(u64, String)> = (0..c.stores.len())
            .filter_map(|i| Some((c.store_id_of(i)?, c.stores[i].addr.clone())))
            .collect();
        lease_observers.push(rt.spawn(etcd_lease::owner_poller(
            lctl.clone(),
            cl.clone(),
            stores,
            (
                atoll_storage::lease::records_start(),
                atoll_storage::lease::records_end(),
            ),
            atoll_storage::lease::record_key,
        )));
    }
    let fctl = FenceCtl::new(clock, nodes.clone());
    let mut fencers = vec![];
    for id in 0..o.fencers {
        fencers.push(rt.spawn(etcd_lease::candidate(
            id,
            fctl.clone(),
            ELECTION.to_vec(),
            ELECTION_LOG.into(),
            seed,
        )));
        fencers.push(rt.spawn(etcd_lease::lock_worker(
            id,
            fctl.clone(),
            LOCK.to_vec(),
            COUNTER.to_vec(),
            seed,
        )));
    }
    let handles: Vec<_> = (0..o.clients)
        .map(|id| rt.spawn(client_loop(id, cl.clone(), w.clone(), seed)))
        .collect();

    let mut nem = Nemesis {
        c: &mut c,
        rng: StdRng::seed_from_u64(seed),
        injected: BTreeMap::new(),
        clock,
        windows: vec![],
    };
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    while start.elapsed() < Duration::from_secs(o.secs) {
        let f = if o.broken_reads {
            // Stale reads need a follower that falls behind: cut one off.
            Fault::PartitionStore(nem.rng.gen_range(0..nem.c.stores.len()))
        } else {
            nem.pick()
        };
        let hold = Duration::from_millis(nem.rng.gen_range(1000..5000));
        nem.run(f, hold);
        std::thread::sleep(Duration::from_millis(nem.rng.gen_range(1000..3000)));
    }
    let mut injected = std::mem::take(&mut nem.injected);
    let windows = std::mem::take(&mut nem.windows);
    // A quiet tail: the cluster heals while the clients go on.
    std::thread::sleep(Duration::from_secs(3));
    w.stop.store(true, Ordering::Relaxed);
    etcd_stop.store(true, Ordering::Relaxed);
    // The keepers let their leases go: the final check waits for them to expire.
    lctl.stop.store(true, Ordering::Relaxed);
    fctl.stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for h in handles.into_iter().chain(writers) {
            let _ = h.await;
        }
        // A lease, election or lock worker panics on an answer etcd's API does not allow.
        for h in keepers.into_iter().chain(fencers) {
            h.await.expect("a lease, election or lock worker failed");
        }
    });
    if let Some(t) = split_thread {
        t.join().expect("splitter");
        injected.insert("Split".into(), splits.load(Ordering::Relaxed));
    }
    let watch = o.watch.then(|| {
        finish_watch(
            &rt,
            &c,
            &wctl,
            watchers,
            history_start,
            std::mem::take(&mut *etcd_writes.lock()),
            splits.load(Ordering::Relaxed),
        )
    });

    let lease = lease_watcher
        .map(|lw| finish_leases(&rt, &c, &lctl, &lwctl, lease_observers, lw, windows.clone()));
    let fence = (o.fencers > 0).then(|| finish_fences(&rt, &c, &fctl));

    // Final read of every key, through the safe path, with every process up.
    let mut fcfg = ClientConfig::new(pd);
    fcfg.timeout = Duration::from_secs(30);
    let fcl = rt.block_on(Client::connect(fcfg)).expect("client");
    let mut finals = HashMap::new();
    for k in &w.keys {
        let v = rt.block_on(fcl.get(k.as_bytes())).unwrap_or_else(|e| {
            c.dump_logs();
            panic!("final read of {k}: {e}")
        });
        finals.insert(k.clone(), s(v));
    }
    let history = std::mem::take(&mut *w.rec.ops.lock());
    let unknown = history.iter().filter(|op| op.is_unknown()).count();
    let t = Instant::now();
    let plain = atoll_tests::linearizability::check(&history, &CheckOptions::default());
    let report = check_with_final_values(&history, &finals, &CheckOptions::default());
    eprintln!("checker: {:?} for {} ops", t.elapsed(), history.len());
    let violations: Vec<String> = plain.violations().iter().map(|k| k.key.clone()).collect();
    // Keys fine without the final read but not with it: an acknowledged write was lost.
    let lost: Vec<String> = report
        .violations()
        .iter()
        .filter(|k| !violations.contains(&k.key))
        .map(|k| k.key.clone())
        .collect();
    if !violations.is_empty() || !lost.is_empty() {
        for k in violations.iter().chain(lost.iter()).take(3) {
            if let Some(r) = report.key(k) {
                eprintln!("{r:?}");
            }
        }
        let dump = c.path().join("history.json");
        std::fs::write(&dump, serde_json::to_vec(&history).unwrap()).unwrap();
        eprintln!("history written to {} (kept)", dump.display());
    }
    let watch_failed = watch
        .as_ref()
        .is_some_and(|x| !x.report.is_ok() || !x.stalled.is_empty());
    let lease_failed = lease
        .as_ref()
        .is_some_and(|x| !x.report.is_ok() || x.report.unjudged > 0);
    let fence_failed = fence
        .as_ref()
        .is_some_and(|x| !x.election.is_ok() || !x.lock.is_ok());
    if !violations.is_empty() || !lost.is_empty() || watch_failed || lease_failed || fence_failed {
        let dir = std::mem::replace(&mut c.dir, tempfile::tempdir().unwrap());
        let _ = dir.keep();
    }
    let counts = w.counts.lock().clone();
    ChaosResult {
        ops: history.len(),
        unknown,
        inconclusive: report.inconclusive().len(),
        violations,
        lost,
        injected,
        counts,
        watch,
        lease,
        fence,
    }
}

/// For a stall: the regions as PD sees them (`regions.json` in the kept directory), and a
/// count-only Range of every watched range through every store (a read at a fresh revision,
/// which meets, and resolves, any lock left in the range), timed.
fn stall_diagnostics(rt: &tokio::runtime::Runtime, c: &ProcCluster, watchers: &[WatcherLog]) {
    let out = c.kvctl(&["--output", "json", "--timeout", "5", "regions"]);
    let _ = std::fs::write(c.path().join("regions.json"), &out.stdout);
    for line in rt.block_on(watch_locks(c)) {
        eprintln!("watch stall: before the reads: {line}");
    }
    // All probes at once, each bounded by 10 s.
    let probes = watchers.iter().flat_map(|w| {
        c.stores.iter().map(move |s| {
            let (name, addr) = (w.name.clone(), s.addr.clone());
            let req = atoll_proto::etcdserverpb::RangeRequest {
                key: w.key.clone(),
                range_end: w.range_end.clone(),
                count_only: true,
                ..Default::default()
            };
            async move {
                let t = Instant::now();
                let mut kv = etcd_watch::kv_client(&addr);
                let r = match tokio::time::timeout(Duration::from_secs(10), kv.range(req)).await {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        let rev = r.header.map_or(0, |h| h.revision);
                        format!("{} keys at {rev}", r.count)
                    }
                    Ok(Err(e)) => format!("error {e}"),
                    Err(_) => "no answer in 10 s".into(),
                };
                format!(
                    "watch stall: Range of {name}'s range through {addr}: {r} in {:?}",
                    t.elapsed()
                )
            }
        })
    });
    for line in rt.block_on(futures::future::join_all(probes)) {
        eprintln!("{line}");
    }
    for line in rt.block_on(watch_locks(c)) {
        eprintln!("watch stall: after the reads: {line}");
    }
}

/// The transaction locks under `watch/` (each region's leader asked), one line each.
async fn watch_locks(c: &ProcCluster) -> Vec<String> {
    let pd = atoll_pd_client::rpc::parse_endpoints(&c.pd_endpoints());
    let Ok(cl) = Client::connect(ClientConfig::new(pd)).await else {
        return vec!["no client".into()];
    };
    let stores: Vec<(u64, String)> = (0..c.stores.len())
        .filter_map(|i| Some((c.store_id_of(i)?, c.stores[i].addr.clone())))
        .collect();
    match etcd_watch::store_locks(&cl, &stores, b"watch/", b"watch0").await {
        Ok(locks) if locks.is_empty() => vec!["no locks under watch/".into()],
        Ok(locks) => locks
            .iter()
            .map(|(s, l)| etcd_watch::show_lock(*s, l))
            .collect(),
        Err(e) => vec![e],
    }
}

/// After the faults healed and the writers stopped: every watcher catches up to the largest
/// acknowledged revision (progress requests until a progress notification reaches it), then
/// the watch checker runs over everything recorded.
fn finish_watch(
    rt: &tokio::runtime::Runtime,
    c: &ProcCluster,
    ctl: &Arc<WatchCtl>,
    watchers: Vec<RecordedWatcher>,
    history_start: i64,
    writes: Vec<EtcdWrite>,
    splits: u64,
) -> WatchResult {
    let target = writes
        .iter()
        .filter_map(|w| match w.outcome {
            watch_check::WriteOutcome::Acked(r) => Some(r),
            watch_check::WriteOutcome::Unknown => None,
        })
        .max()
        .unwrap_or(history_start)
        .max(history_start + 1);
    ctl.catch_up_to.store(target, Ordering::Relaxed);
    let t = Instant::now();
    let mut stalled = vec![];
    let mut logs = vec![];
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        for (log, h) in watchers {
            let name = log.lock().name.clone();
            match tokio::time::timeout_at(deadline, h).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(e))) => stalled.push(format!("{name}: {e}")),
                Ok(Err(e)) => stalled.push(format!("{name}: task failed: {e}")),
                Err(_) => stalled.push(format!("{name}: not caught up to {target} in 90 s")),
            }
            logs.push(log);
        }
    });
    ctl.stop.store(true, Ordering::Relaxed);
    eprintln!(
        "watch: caught up to {target} in {:?}; {} stalled",
        t.elapsed(),
        stalled.len()
    );
    let history = watch_check::History {
        history_start,
        writes,
        watchers: logs.iter().map(|l| l.lock().clone()).collect(),
    };
    let t = Instant::now();
    let report = watch_check::check(&history);
    eprintln!("watch checker: {:?}\n{report}", t.elapsed());
    for s in &stalled {
        eprintln!("watch: stalled watcher {s}");
    }
    if !stalled.is_empty() {
        stall_diagnostics(rt, c, &history.watchers);
    }
    if !report.is_ok() || !stalled.is_empty() {
        let dump = c.path().join("watch_history.json");
        std::fs::write(&dump, serde_json::to_vec(&history).unwrap()).unwrap();
        eprintln!("watch history written to {} (kept)", dump.display());
    }
    WatchResult {
        report,
        stalled,
        splits,
        target,
    }
}

/// What the lease workers and checker found.
struct LeaseResult {
    report: lease_check::Report,
    /// The deletes watcher never caught up (its deletes may be incomplete; not a violation).
    watch_stalled: Option<String>,
}

/// After the keepers let their leases go: observe until every lease's late limit has passed
/// (the final, strict check: no fault is left to push it; capped at 40 s), let the deletes
/// watcher catch up with the last observation, and check.
fn finish_leases(
    rt: &tokio::runtime::Runtime,
    c: &ProcCluster,
    ctl: &Arc<LeaseCtl>,
    wctl: &Arc<WatchCtl>,
    observers: Vec<tokio::task::JoinHandle<()>>,
    watcher: RecordedWatcher,
    faults: Vec<FaultWindow>,
) -> LeaseResult {
    let (grace, settle) = (2 * SEC, 6 * SEC);
    let clock = ctl.clock;
    let cap = clock.now() + 40 * SEC;
    let t = Instant::now();
    loop {
        let limit = {
            let leases = ctl.leases.lock();
            let owners = ctl.owners.lock();
            leases
                .iter()
                .map(|l| lease_check::late_limit(l, &faults, &owners, grace, settle))
                .max()
                .unwrap_or(0)
        };
        let target = (limit + 500 * MS).min(cap);
        if clock.now() >= target {
            break;
        }
        std::thread::sleep(etcd_lease::until(clock, target).min(Duration::from_secs(1)));
    }
    ctl.stop_observing.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for h in observers {
            let _ = h.await;
        }
    });
    let observations = std::mem::take(&mut *ctl.observations.lock());
    let target = observations.iter().map(|o| o.revision).max().unwrap_or(0);
    wctl.catch_up_to.store(target.max(1), Ordering::Relaxed);
    let (log, h) = watcher;
    let watch_stalled = rt.block_on(async {
        match tokio::time::timeout(Duration::from_secs(30), h).await {
            Ok(Ok(Ok(_))) => None,
            Ok(Ok(Err(e))) => Some(e),
            Ok(Err(e)) => Some(format!("task failed: {e}")),
            Err(_) => Some(format!("not caught up to {target} in 30 s")),
        }
    });
    wctl.stop.store(true, Ordering::Relaxed);
    let deletes: Vec<WatchedDelete> = log
        .lock()
        .incarnations
        .iter()
        .flat_map(|i| i.responses.iter())
        .flat_map(|r| {
            r.events
                .iter()
                .filter(|e| e.kind == EventKind::Delete)
                .map(move |e| WatchedDelete {
                    received: r.received_ns,
                    key: e.kv.key.clone(),
                    revision: e.kv.mod_revision,
                })
        })
        .collect();
    let history = LeaseHistory {
        leases: std::mem::take(&mut *ctl.leases.lock()),
        observations,
        deletes,
        faults,
        owners: std::mem::take(&mut *ctl.owners.lock()),
        grace,
        settle,
    };
    eprintln!(
        "lease: observed every lease past its late limit in {:?}",
        t.elapsed()
    );
    let report = lease_check::check(&history);
    eprintln!("{report}");
    if let Some(s) = &watch_stalled {
        eprintln!("lease: the deletes watcher stalled: {s}");
    }
    if let Ok(dir) = std::env::var("ATOLL_CHAOS_HISTORIES") {
        let dump = std::path::Path::new(&dir).join("lease_history.json");
        std::fs::write(&dump, serde_json::to_vec(&history).unwrap()).unwrap();
    }
    if !report.is_ok() || report.unjudged > 0 {
        let dump = c.path().join("lease_history.json");
        std::fs::write(&dump, serde_json::to_vec(&history).unwrap()).unwrap();
        eprintln!("lease history written to {} (kept)", dump.display());
    }
    LeaseResult {
        report,
        watch_stalled,
    }
}

/// What the election and lock workers and checkers found.
struct FenceResult {
    election: fence_check::Report,
    lock: fence_check::Report,
    /// Calls that failed (campaign, lock, resign, unlock errors ...).
    errors: BTreeMap<String, u64>,
}

fn finish_fences(
    rt: &tokio::runtime::Runtime,
    c: &ProcCluster,
    ctl: &Arc<FenceCtl>,
) -> FenceResult {
    let final_counter = rt.block_on(etcd_lease::read_counter(
        &ctl.nodes,
        COUNTER,
        Duration::from_secs(30),
    ));
    let election = ElectionHistory {
        leaderships: std::mem::take(&mut *ctl.leaderships.lock()),
        writes: std::mem::take(&mut *ctl.writes.lock()),
    };
    let lock = LockHistory {
        sections: std::mem::take(&mut *ctl.sections.lock()),
        final_counter,
    };
    let er = fence_check::check_election(&election);
    let lr = fence_check::check_lock(&lock);
    eprintln!("election {er}lock {lr}");
    let v = serde_json::json!({ "election": election, "lock": lock });
    if let Ok(dir) = std::env::var("ATOLL_CHAOS_HISTORIES") {
        let dump = std::path::Path::new(&dir).join("fence_history.json");
        std::fs::write(&dump, serde_json::to_vec(&v).unwrap()).unwrap();
    }
    if !er.is_ok() || !lr.is_ok() {
        let dump = c.path().join("fence_history.json");
        std::fs::write(&dump, serde_json::to_vec(&v).unwrap()).unwrap();
        eprintln!(
            "election and lock history written to {} (kept)",
            dump.display()
        );
    }
    FenceResult {
        election: er,
        lock: lr,
        errors: ctl.counts.lock().clone(),
    }
}

fn report(r: &ChaosResult) {
    eprintln!(
        "chaos: {} operations recorded ({} unknown), attempted {:?}; faults {:?}; \
         {} linearizability violations, {} lost writes, {} inconclusive keys",
        r.ops,
        r.unknown,
        r.counts,
        r.injected,
        r.violations.len(),
        r.lost.len(),
        r.inconclusive
    );
    if let Some(wr) = &r.watch {
        eprintln!(
            "chaos watch: {} events checked, {} resumes, faults {:?} ({} splits), {} violations, \
             {} watchers stalled; caught up to {}; {}",
            wr.report.events_checked,
            wr.report.resumes,
            r.injected,
            wr.splits,
            wr.report.violations.len(),
            wr.stalled.len(),
            wr.target,
            wr.report.summary()
        );
    }
    if let Some(lr) = &r.lease {
        let rep = &lr.report;
        eprintln!(
            "chaos leases: {} leases, {} keep-alives, {} early expiries, {} missed expiries \
             ({} revoked keys present, {} not atomic); {}{}",
            rep.leases,
            rep.keep_alives,
            rep.count(lease_check::Kind::EarlyExpiry),
            rep.count(lease_check::Kind::MissedExpiry),
            rep.count(lease_check::Kind::RevokedPresent),
            rep.count(lease_check::Kind::NotAtomic),
            rep.summary(),
            lr.watch_stalled
                .as_ref()
                .map_or(String::new(), |s| format!("; deletes watcher stalled: {s}"))
        );
    }
    if let Some(f) = &r.fence {
        eprintln!(
            "chaos election: {} double leaders; {}",
            f.election.count(fence_check::Kind::DoubleLeader),
            f.election.summary()
        );
        eprintln!(
            "chaos lock: {} overlapping locks, {} lost updates; {}; failed calls {:?}",
            f.lock.count(fence_check::Kind::LockOverlap),
            f.lock.count(fence_check::Kind::LostUpdate),
            f.lock.summary(),
            f.errors
        );
    }
}

fn secs(default: u64) -> u64 {
    std::env::var("ATOLL_CHAOS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn assert_clean(r: &ChaosResult) {
    report(r);
    assert!(
        r.violations.is_empty(),
        "linearizability violations on {:?}",
        r.violations
    );
    assert!(
        r.lost.is_empty(),
        "lost acknowledged writes on {:?}",
        r.lost
    );
    assert_eq!(r.inconclusive, 0, "the checker ran out of budget");
    assert!(
        r.ops > 1000,
        "too few operations to mean anything: {}",
        r.ops
    );
    assert!(
        r.injected.values().sum::<u64>() >= 5,
        "too few faults: {:?}",
        r.injected
    );
    if let Some(wr) = &r.watch {
        assert!(
            wr.stalled.is_empty(),
            "watchers never caught up: {:?}",
            wr.stalled
        );
        assert!(wr.report.is_ok(), "watch violations:\n{}", wr.report);
        assert!(
            wr.report.writes_acked > 100 && wr.report.events_checked > 500,
            "too few etcd writes or watch events to mean anything: {}",
            wr.report.summary()
        );
    }
    if let Some(lr) = &r.lease {
        assert!(lr.report.is_ok(), "lease violations:\n{}", lr.report);
        assert_eq!(
            lr.report.unjudged,
            0,
            "leases never observed past their late limit: {}",
            lr.report.summary()
        );
        assert!(
            lr.report.leases >= 5 && lr.report.keep_alives_renewed >= 10,
            "too few leases or keep-alives to mean anything: {}",
            lr.report.summary()
        );
    }
    if let Some(f) = &r.fence {
        assert!(f.election.is_ok(), "election violations:\n{}", f.election);
        assert!(f.lock.is_ok(), "lock violations:\n{}", f.lock);
        assert!(
            f.election.writes_ok >= 5 && f.lock.writes_ok >= 5,
            "too few guarded writes to mean anything: election {}; lock {}",
            f.election.summary(),
            f.lock.summary()
        );
    }
}

/// Election candidates and lock workers, of each.
const FENCERS: usize = 3;

#[test]
fn chaos_bounded() {
    let _g = SERIAL.lock();
    let r = run_chaos(ChaosOpts {
        secs: secs(60),
        clients: 12,
        keys: 48,
        broken_reads: false,
        watch: true,
        keepers: 4,
        fencers: FENCERS,
    });
    assert_clean(&r);
}

#[test]
fn chaos_long() {
    if std::env::var("ATOLL_CHAOS_LONG").map_or(true, |v| v != "1") {
        eprintln!("skipped: set ATOLL_CHAOS_LONG=1 for the 10-minute run");
        return;
    }
    let _g = SERIAL.lock();
    let r = run_chaos(ChaosOpts {
        secs: secs(600),
        clients: 16,
        keys: 64,
        broken_reads: false,
        watch: true,
        keepers: 4,
        fencers: FENCERS,
    });
    assert_clean(&r);
}

/// The checker is only worth something if it catches a broken store: with reads served by
/// any peer from what it has applied (no ReadIndex), a partitioned follower answers stale
/// values, and the history must be found non-linearizable.
#[test]
fn chaos_checker_catches_stale_follower_reads() {
    let _g = SERIAL.lock();
    let r = run_chaos(ChaosOpts {
        secs: 25,
        clients: 8,
        keys: 8,
        broken_reads: true,
        watch: false,
        keepers: 0,
        fencers: 0,
    });
    report(&r);
    assert!(
        !r.violations.is_empty() || !r.lost.is_empty(),
        "the checker missed stale reads from a partitioned follower"
    );
}
