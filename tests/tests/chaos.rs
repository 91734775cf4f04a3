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

use atoll_client::{Client, ClientConfig, Error};
use atoll_tests::linearizability::{
    check_with_final_values, CheckOptions, OpKind, Operation, Outcome,
};
use atoll_tests::procs::{http, ClusterOpts, ProcCluster};
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
}

struct ChaosResult {
    ops: usize,
    unknown: usize,
    violations: Vec<String>,
    inconclusive: usize,
    lost: Vec<String>,
    injected: BTreeMap<String, u64>,
    counts: BTreeMap<&'static str, u64>,
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
    let split: Vec<String> = (1..4)
        .map(|i| format!("chaos/k{:03}", i * o.keys / 4))
        .collect();
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
    let handles: Vec<_> = (0..o.clients)
        .map(|id| rt.spawn(client_loop(id, cl.clone(), w.clone(), seed)))
        .collect();

    let mut nem = Nemesis {
        c: &mut c,
        rng: StdRng::seed_from_u64(seed),
        injected: BTreeMap::new(),
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
    let injected = std::mem::take(&mut nem.injected);
    // A quiet tail: the cluster heals while the clients go on.
    std::thread::sleep(Duration::from_secs(3));
    w.stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for h in handles {
            let _ = h.await;
        }
    });

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
}

#[test]
fn chaos_bounded() {
    let _g = SERIAL.lock();
    let r = run_chaos(ChaosOpts {
        secs: secs(60),
        clients: 12,
        keys: 48,
        broken_reads: false,
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
    });
    report(&r);
    assert!(
        !r.violations.is_empty() || !r.lost.is_empty(),
        "the checker missed stale reads from a partitioned follower"
    );
}
