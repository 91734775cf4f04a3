//! Every failpoint of the project (docs/failpoints.md), each injected into a running cluster:
//! the fault's effect is checked where it can be seen (a process crashed, a request failed
//! cleanly, a leader stepped down, PD's view went stale, ...), the fault is removed or the
//! crashed process restarted, and the cluster is shown to recover with every acknowledged
//! write intact — read back through the cluster and from each store's own copy.
//!
//! Its own test binary: the `fail` registry is process-wide. The multi-process tests set
//! failpoints inside the real binaries, at start through `FAILPOINTS` and at run time through
//! the status address (`PUT`/`DELETE /fail/<name>`); the snapshot tests run an in-process
//! cluster and use `fail::cfg`.
//!
//! | test | failpoints |
//! | --- | --- |
//! | `crash_in_raft_and_apply_paths_loses_nothing` | `raftstore::before_persist`, `after_persist`, `before_apply`, `apply_before_write` |
//! | `crash_in_split_and_conf_change_apply_loses_nothing` | `raftstore::apply_split`, `apply_conf_change` |
//! | `failed_snapshot_apply_is_retried` | `raftstore::snap_apply` |
//! | `failed_snapshot_generation_is_retried` | `raftstore::snap_generate` |
//! | `dropped_pd_heartbeats_go_stale_then_converge` | `raftstore::pd_region_heartbeat`, `pd_store_heartbeat` |
//! | `partitions_and_a_slow_network_lose_nothing` | `transport::send_drop`, `recv_drop`, `send_delay` |
//! | `failing_writes_and_txn_commands_stay_all_or_nothing` | `storage::before_plain_write`, `after_write_applied`, `txn::prewrite`, `txn::commit` |
//! | `client_dying_mid_commit_leaves_locks_readers_resolve` | `client::txn_after_prewrite`, `txn_after_primary_commit` |
//! | `tso_failpoints_fail_cleanly_and_time_never_goes_back` | `pd::tso_alloc`, `pd::tso_save` |
//! | `slow_apply_under_a_write_flood_keeps_memory_flat` | `raftstore::before_apply` (pause) |

use atoll_client::{Client, ClientConfig};
use atoll_proto::kvrpcpb;
use atoll_proto::kvrpcpb::kv_client::KvClient;
use atoll_raftstore::failpoints as rfp;
use atoll_tests::procs::{
    self, list_failpoints, regions_healthy, remove_failpoint, set_failpoint, status_json,
    ClusterOpts, ProcCluster,
};
use atoll_tests::{runtime, wait_until};
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SEND_DROP: &str = "transport::send_drop";
const RECV_DROP: &str = "transport::recv_drop";
const SEND_DELAY: &str = "transport::send_delay";
const BEFORE_PLAIN_WRITE: &str = "storage::before_plain_write";
const AFTER_WRITE_APPLIED: &str = "storage::after_write_applied";
const PREWRITE: &str = "txn::prewrite";
const COMMIT: &str = "txn::commit";
const CLIENT_AFTER_PREWRITE: &str = "client::txn_after_prewrite";
const CLIENT_AFTER_PRIMARY_COMMIT: &str = "client::txn_after_primary_commit";
const TSO_SAVE: &str = "pd::tso_save";
const TSO_ALLOC: &str = "pd::tso_alloc";

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

fn out_str(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn err_str(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

/// A kvctl failure the contract allows: non-zero exit and one line on stderr.
fn assert_clean_failure(o: &Output, what: &str) {
    assert!(!o.status.success(), "{what}: succeeded: {}", out_str(o));
    let e = err_str(o);
    assert_eq!(e.lines().count(), 1, "{what}: not one line on stderr: {e}");
    assert!(e.starts_with("kvctl: "), "{what}: {e}");
}

fn must_ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what} failed: {}", err_str(o));
}

fn client(c: &ProcCluster, rt: &tokio::runtime::Runtime) -> Arc<Client> {
    let mut cfg = ClientConfig::new(atoll_pd_client::rpc::parse_endpoints(&c.pd_endpoints()));
    cfg.timeout = Duration::from_secs(15);
    cfg.rpc_timeout = Duration::from_secs(2);
    rt.block_on(Client::connect(cfg)).expect("client")
}

/// kvctl with `--output json`; `None` if it failed.
fn try_json(c: &ProcCluster, args: &[&str]) -> Option<Value> {
    let mut a = vec!["--output", "json"];
    a.extend_from_slice(args);
    let o = c.kvctl(&a);
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

/// `kvctl get` in JSON: `Some(value)` or `None` when absent; panics if kvctl fails.
fn kv_get(c: &ProcCluster, key: &str) -> Option<String> {
    let v = c.kvctl_json(&["get", key]);
    v["value"].as_str().map(str::to_string)
}

fn wait_healthy(c: &ProcCluster, timeout: Duration) {
    let ok = wait_until(timeout, || {
        try_json(c, &["regions"]).is_some_and(|v| regions_healthy(&v, 3))
    });
    if !ok {
        c.dump_logs();
        save_logs(c);
    }
    assert!(
        ok,
        "regions never became healthy: {:?}",
        try_json(c, &["regions"])
    );
}

/// One PD and `stores` storage nodes (which allow the test-only local reads used to check
/// each store's own copy), ready and with every region fully replicated.
fn start_cluster(stores: usize, store_args: &[&str], pd_args: &[&str]) -> ProcCluster {
    let mut sa: Vec<String> = vec!["--allow-unsafe-local-read".into()];
    sa.extend(store_args.iter().map(|s| s.to_string()));
    let c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores,
        store_args: sa,
        pd_args: pd_args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(60));
    wait_healthy(&c, Duration::from_secs(60));
    c
}

fn must_split(c: &ProcCluster, keys: &[&str]) {
    let mut a = vec!["split"];
    a.extend_from_slice(keys);
    must_ok(&c.kvctl(&a), &format!("split {keys:?}"));
    wait_healthy(c, Duration::from_secs(60));
}

/// Sets a failpoint on every storage node at run time.
fn set_on_all_stores(c: &ProcCluster, name: &str, action: &str) {
    for s in &c.stores {
        set_failpoint(&s.status_addr, name, action);
    }
}

fn remove_on_all_stores(c: &ProcCluster, name: &str) {
    for s in &c.stores {
        remove_failpoint(&s.status_addr, name);
    }
}

/// Leaders a store holds, from its own status page.
fn leaders_on(c: &ProcCluster, i: usize) -> Option<u64> {
    status_json(&c.stores[i].status_addr).and_then(|v| v["leaders"].as_u64())
}

/// The store (index) among `among` leading the most regions.
fn busiest(c: &ProcCluster, among: &[usize]) -> usize {
    *among
        .iter()
        .max_by_key(|i| leaders_on(c, **i).unwrap_or(0))
        .expect("a store")
}

/// A store's id by index, from PD (by address).
fn store_id(c: &ProcCluster, i: usize) -> u64 {
    let mut id = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            id = try_json(c, &["stores"]).and_then(|v| {
                v["stores"]
                    .as_array()?
                    .iter()
                    .find(|s| s["address"] == c.stores[i].addr.as_str())
                    .and_then(|s| s["id"].as_u64())
            });
            id.is_some()
        }),
        "PD does not know store index {i}"
    );
    id.unwrap()
}

/// PD's record of one store.
fn pd_store(c: &ProcCluster, id: u64) -> Option<Value> {
    try_json(c, &["stores"])?["stores"]
        .as_array()?
        .iter()
        .find(|s| s["id"].as_u64() == Some(id))
        .cloned()
}

/// Writes its own keys in a loop (several concurrent writers) and records what was
/// acknowledged. Key `PREFIX{d}{w}-{i}`: the digit `d` spreads them over split points.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<parking_lot::Mutex<Vec<(String, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writer {
    fn start(
        rt: &tokio::runtime::Runtime,
        cl: &Arc<Client>,
        prefix: &str,
        writers: usize,
    ) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let mut tasks = vec![];
        for w in 0..writers {
            let (cl, stop, acked, prefix) =
                (cl.clone(), stop.clone(), acked.clone(), prefix.to_string());
            tasks.push(rt.spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let k = format!("{prefix}{}{w}-{i:06}", i % 10);
                    let v = format!("v{w}-{i}");
                    if cl.put(k.as_bytes(), v.as_bytes()).await.is_ok() {
                        acked.lock().push((k, v));
                    }
                    i += 1;
                }
            }));
        }
        Writer { stop, acked, tasks }
    }

    fn count(&self) -> usize {
        self.acked.lock().len()
    }

    fn acked(&self) -> BTreeMap<String, String> {
        self.acked.lock().iter().cloned().collect()
    }

    /// Asserts that `n` more writes are acknowledged within `timeout` (the cluster serves).
    fn must_progress(&self, c: &ProcCluster, n: usize, timeout: Duration, what: &str) {
        let base = self.count();
        let start = Instant::now();
        let ok = wait_until(timeout, || self.count() >= base + n);
        if !ok {
            c.dump_logs();
            save_logs(c);
        }
        assert!(
            ok,
            "writes stalled ({what}): {} acknowledged in {:?}; regions: {:?}",
            self.count() - base,
            start.elapsed(),
            try_json(c, &["regions"])
        );
    }

    fn stop(self, rt: &tokio::runtime::Runtime) -> BTreeMap<String, String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = rt.block_on(t);
        }
        let acked = self.acked.lock().iter().cloned().collect();
        acked
    }
}

/// Every acknowledged write reads back through the cluster (one linearizable scan).
fn must_read_back(c: &ProcCluster, start: &str, end: &str, acked: &BTreeMap<String, String>) {
    let mut got: BTreeMap<String, String> = BTreeMap::new();
    let ok = wait_until(Duration::from_secs(60), || {
        let Some(v) = try_json(c, &["--timeout", "30", "scan", start, end]) else {
            return false;
        };
        got = v["kvs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|kv| {
                        (
                            kv["key"].as_str().unwrap_or_default().to_string(),
                            kv["value"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        true
    });
    assert!(ok, "scan [{start}, {end}) never succeeded");
    let lost: Vec<_> = acked
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(*v))
        .take(5)
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged writes lost or wrong (of {}), e.g. {lost:?}",
        acked.len()
    );
}

/// The regions overlapping `[start, end)` that have a peer on `store_id` (PD's view): a
/// request context for that peer (test-only local read: no ReadIndex, whatever it applied)
/// and the part of the range inside the region.
async fn local_targets(
    cl: &Client,
    store_id: u64,
    start: &[u8],
    end: &[u8],
) -> Result<Vec<(kvrpcpb::Context, Vec<u8>, Vec<u8>)>, String> {
    let regions = cl
        .pd()
        .scan_regions(start, end, 0)
        .await
        .map_err(|e| e.to_string())?;
    let mut out = vec![];
    for r in regions {
        let g = r.region;
        let Some(peer) = g.peers.iter().find(|p| p.store_id == store_id).copied() else {
            continue;
        };
        let s = std::cmp::max(start.to_vec(), g.start_key.clone());
        let e = match (end.is_empty(), g.end_key.is_empty()) {
            (true, _) => g.end_key.clone(),
            (false, true) => end.to_vec(),
            (false, false) => std::cmp::min(end.to_vec(), g.end_key.clone()),
        };
        let ctx = kvrpcpb::Context {
            region_id: g.id,
            region_epoch: g.region_epoch,
            peer: Some(peer),
            unsafe_local_read: true,
            ..Default::default()
        };
        out.push((ctx, s, e));
    }
    Ok(out)
}

/// What store `store_id` itself holds in `[start, end)`, read from its own peers: the pairs,
/// and the ranges it covers (regions without a peer there are not its to hold).
async fn store_copy(
    cl: &Client,
    store_id: u64,
    addr: &str,
    start: &[u8],
    end: &[u8],
) -> Result<(BTreeMap<Vec<u8>, Vec<u8>>, Vec<(Vec<u8>, Vec<u8>)>), String> {
    let targets = local_targets(cl, store_id, start, end).await?;
    let mut kv = KvClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let mut out = BTreeMap::new();
    let mut covered = vec![];
    for (ctx, s, e) in targets {
        let resp = kv
            .kv_scan(kvrpcpb::ScanRequest {
                context: Some(ctx),
                start_key: s.clone(),
                end_key: e.clone(),
                limit: 0,
                key_only: false,
                reverse: false,
                version: 0,
            })
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        if let Some(re) = resp.region_error {
            return Err(format!("region error: {re:?}"));
        }
        if let Some(ke) = resp.error {
            return Err(format!("key error: {ke:?}"));
        }
        for p in resp.pairs {
            out.insert(p.key, p.value);
        }
        covered.push((s, e));
    }
    Ok((out, covered))
}

/// The locks store `store_id`'s own copy holds in `[start, end)`.
async fn store_locks(
    cl: &Client,
    store_id: u64,
    addr: &str,
    start: &[u8],
    end: &[u8],
) -> Result<Vec<kvrpcpb::LockInfo>, String> {
    let targets = local_targets(cl, store_id, start, end).await?;
    let mut kv = KvClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let mut out = vec![];
    for (ctx, s, e) in targets {
        let resp = kv
            .kv_scan_lock(kvrpcpb::ScanLockRequest {
                context: Some(ctx),
                max_version: u64::MAX,
                start_key: s,
                end_key: e,
                limit: 0,
            })
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        if let Some(re) = resp.region_error {
            return Err(format!("region error: {re:?}"));
        }
        if let Some(ke) = resp.error {
            return Err(format!("key error: {ke:?}"));
        }
        out.extend(resp.locks);
    }
    Ok(out)
}

fn in_ranges(k: &[u8], ranges: &[(Vec<u8>, Vec<u8>)]) -> bool {
    ranges
        .iter()
        .any(|(s, e)| k >= s.as_slice() && (e.is_empty() || k < e.as_slice()))
}

/// Waits until store `i`'s own copy holds every acknowledged write of `[start, end)` in the
/// regions it has a peer of (it recovered, and caught up).
fn must_store_hold(
    c: &ProcCluster,
    rt: &tokio::runtime::Runtime,
    cl: &Client,
    i: usize,
    start: &str,
    end: &str,
    acked: &BTreeMap<String, String>,
) {
    let id = store_id(c, i);
    let addr = c.stores[i].addr.clone();
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(60), || {
        match rt.block_on(store_copy(cl, id, &addr, start.as_bytes(), end.as_bytes())) {
            Ok((kvs, covered)) => {
                let missing: Vec<&String> = acked
                    .iter()
                    .filter(|(k, v)| {
                        in_ranges(k.as_bytes(), &covered)
                            && kvs.get(k.as_bytes()).map(Vec::as_slice) != Some(v.as_bytes())
                    })
                    .map(|(k, _)| k)
                    .collect();
                let checked = acked
                    .keys()
                    .filter(|k| in_ranges(k.as_bytes(), &covered))
                    .count();
                last = format!(
                    "{} of {checked} missing, e.g. {:?}",
                    missing.len(),
                    missing.iter().take(3).collect::<Vec<_>>()
                );
                missing.is_empty()
            }
            Err(e) => {
                last = e;
                false
            }
        }
    });
    if !ok {
        c.dump_logs();
        save_logs(c);
    }
    assert!(
        ok,
        "store{} (id {id}) does not hold every acknowledged write: {last}",
        i + 1
    );
}

/// Copies the cluster's log files somewhere that outlives the test (its directory does not),
/// for the diagnosis of a failure.
fn save_logs(c: &ProcCluster) {
    let dst = std::env::temp_dir().join(format!("atoll-failpoints-logs-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dst);
    if let Ok(rd) = std::fs::read_dir(c.path()) {
        for e in rd.flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(e.path(), dst.join(e.file_name()));
            }
        }
    }
    eprintln!("logs kept in {}", dst.display());
}

/// PD's record of the region holding `key`.
fn region_of(c: &ProcCluster, key: &str) -> Option<Value> {
    try_json(c, &["regions"])?["regions"]
        .as_array()?
        .iter()
        .find(|r| {
            let s = r["start_key"].as_str().unwrap_or_default();
            let e = r["end_key"].as_str().unwrap_or_default();
            s <= key && (e.is_empty() || key < e)
        })
        .cloned()
}

fn log_of(c: &ProcCluster, i: usize) -> String {
    std::fs::read_to_string(&c.stores[i].proc_.log).unwrap_or_default()
}

/// Asserts store `i` died (non-zero exit) because failpoint `fp` panicked in it.
fn must_crash(c: &mut ProcCluster, i: usize, fp: &str, timeout: Duration) {
    let st = c.stores[i].proc_.wait_exit(timeout);
    assert!(
        st.is_some_and(|s| !s.success()),
        "store{} did not crash on {fp} within {timeout:?} (exit: {st:?})\n{}",
        i + 1,
        c.stores[i].proc_.log_tail(30)
    );
    let log = log_of(c, i);
    assert!(
        log.contains(&format!("failpoint {fp} panic")),
        "store{} crashed, but not on {fp}:\n{}",
        i + 1,
        c.stores[i].proc_.log_tail(30)
    );
    eprintln!("store{} crashed on {fp}: {st:?}", i + 1);
}

// ---------------------------------------------------------------------------------------------
// crashes (raftstore::before_persist, after_persist, before_apply, apply_before_write,
// apply_split, apply_conf_change)
// ---------------------------------------------------------------------------------------------

/// A store crashes (the failpoint's `panic`; a panicking store aborts) at each point of the
/// write path in turn, under load; the other two keep serving; restarted on its own data, it
/// recovers and catches up; nothing acknowledged is lost, in the cluster or in any copy.
#[test]
fn crash_in_raft_and_apply_paths_loses_nothing() {
    let mut c = start_cluster(3, &[], &[]);
    must_split(&c, &["crash/3", "crash/6"]);
    let rt = runtime();
    let cl = client(&c, &rt);
    let w = Writer::start(&rt, &cl, "crash/", 4);
    let points = [
        rfp::BEFORE_PERSIST,
        rfp::AFTER_PERSIST,
        rfp::BEFORE_APPLY,
        rfp::AFTER_APPLY_BEFORE_WRITE,
    ];
    for (n, fp) in points.iter().enumerate() {
        let victim = n % 3;
        w.must_progress(&c, 20, Duration::from_secs(60), &format!("before {fp}"));
        set_failpoint(&c.stores[victim].status_addr, fp, "panic");
        must_crash(&mut c, victim, fp, Duration::from_secs(30));
        w.must_progress(
            &c,
            20,
            Duration::from_secs(60),
            &format!("store{} down after {fp}", victim + 1),
        );
        // Restarted on its data dir (run-time failpoints are gone): it recovers and catches up.
        c.stores[victim].proc_.start();
        let so_far = w.acked();
        must_store_hold(&c, &rt, &cl, victim, "crash/", "crash0", &so_far);
        eprintln!(
            "store{} recovered from {fp} ({} writes so far)",
            victim + 1,
            so_far.len()
        );
    }
    let acked = w.stop(&rt);
    assert!(
        acked.len() >= 200,
        "only {} writes acknowledged",
        acked.len()
    );
    must_read_back(&c, "crash/", "crash0", &acked);
    for i in 0..3 {
        must_store_hold(&c, &rt, &cl, i, "crash/", "crash0", &acked);
    }
}

/// The leader of a region crashes while applying its split, and later a store crashes while
/// applying a membership change (a new store joins and PD moves peers onto it). Each restarts,
/// the split and the membership change complete, and nothing acknowledged is lost.
#[test]
fn crash_in_split_and_conf_change_apply_loses_nothing() {
    let mut c = start_cluster(3, &[], &[]);
    let rt = runtime();
    let cl = client(&c, &rt);
    let w = Writer::start(&rt, &cl, "adm/", 4);
    w.must_progress(&c, 100, Duration::from_secs(60), "initial load");

    // raftstore::apply_split on the region's leader.
    let leader_store = region_of(&c, "adm/5").expect("region of adm/5")["leader"]["store_id"]
        .as_u64()
        .expect("a leader");
    let victim = c.store_index_of(leader_store).expect("leader's index");
    set_failpoint(&c.stores[victim].status_addr, rfp::APPLY_SPLIT, "panic");
    // The leader dies applying it: kvctl may or may not hear back.
    let o = c.kvctl(&["--timeout", "10", "split", "adm/5"]);
    eprintln!(
        "split while its leader crashes: ok={} {}",
        o.status.success(),
        err_str(&o)
    );
    must_crash(&mut c, victim, rfp::APPLY_SPLIT, Duration::from_secs(30));
    w.must_progress(&c, 20, Duration::from_secs(60), "after the split crash");
    c.stores[victim].proc_.start();
    // The split was committed: it completes everywhere (PD sees a region starting at adm/5).
    let ok = wait_until(Duration::from_secs(60), || {
        region_of(&c, "adm/5").is_some_and(|r| r["start_key"] == "adm/5")
            && try_json(&c, &["regions"]).is_some_and(|v| regions_healthy(&v, 3))
    });
    assert!(
        ok,
        "split never completed: {:?}",
        try_json(&c, &["regions"])
    );
    must_store_hold(&c, &rt, &cl, victim, "adm/", "adm0", &w.acked());

    // raftstore::apply_conf_change on another store; a fourth store makes PD move peers.
    // (Peers made later must have larger ids than the split's: the stores rely on it.)
    let peer_ids = |c: &ProcCluster, store: Option<u64>| -> Vec<u64> {
        try_json(c, &["regions"]).map_or(vec![], |v| {
            v["regions"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|r| r["peers"].as_array().cloned().unwrap_or_default())
                .filter(|p| store.is_none() || p["store_id"].as_u64() == store)
                .filter_map(|p| p["id"].as_u64())
                .collect()
        })
    };
    let newest_before = peer_ids(&c, None).into_iter().max().expect("peers");
    let victim2 = (victim + 1) % 3;
    set_failpoint(
        &c.stores[victim2].status_addr,
        rfp::APPLY_CONF_CHANGE,
        "panic",
    );
    let fourth = c.add_store();
    must_crash(
        &mut c,
        victim2,
        rfp::APPLY_CONF_CHANGE,
        Duration::from_secs(90),
    );
    w.must_progress(
        &c,
        20,
        Duration::from_secs(60),
        "after the conf change crash",
    );
    c.stores[victim2].proc_.start();
    let id4 = store_id(&c, fourth);
    let ok = wait_until(Duration::from_secs(120), || {
        try_json(&c, &["regions"]).is_some_and(|v| regions_healthy(&v, 3))
            && pd_store(&c, id4).is_some_and(|s| s["region_count"].as_u64().unwrap_or(0) > 0)
    });
    assert!(
        ok,
        "membership never settled with the new store: {:?}",
        try_json(&c, &["regions"])
    );
    let moved = peer_ids(&c, Some(id4));
    assert!(
        !moved.is_empty() && moved.iter().all(|id| *id > newest_before),
        "peers added after the split have smaller ids ({moved:?}) than it made ({newest_before})"
    );
    let acked = w.stop(&rt);
    must_read_back(&c, "adm/", "adm0", &acked);
    for i in 0..4 {
        must_store_hold(&c, &rt, &cl, i, "adm/", "adm0", &acked);
    }
}

// ---------------------------------------------------------------------------------------------
// snapshots (raftstore::snap_apply, snap_generate): in-process
// ---------------------------------------------------------------------------------------------

/// Serialises the in-process tests: they share this binary's failpoint registry.
static IN_PROCESS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Removes a failpoint when dropped (also when the test fails).
struct FailGuard(&'static str);
impl Drop for FailGuard {
    fn drop(&mut self) {
        fail::remove(self.0);
    }
}

fn key(i: usize) -> Vec<u8> {
    format!("k{i:06}").into_bytes()
}

/// A follower misses 300 writes and the log is compacted past it, so it needs a snapshot;
/// the snapshot fails three times at `fp`; the follower must still catch up with every key.
fn follower_catches_up_despite_failing_snapshots(
    fp: &'static str,
    failures: impl Fn(&atoll_raftstore::metrics::StoreMetrics) -> u64,
) {
    let _serial = IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        atoll_util::failpoints::enabled(),
        "this test binary was built without failpoints"
    );
    use atoll_test_cluster::{Cluster, IsolateStore};
    let mut c = Cluster::new(3);
    c.run();
    c.must_put(b"k", b"v");
    let leader = c.wait_leader(1, Duration::from_secs(10)).unwrap();
    let follower = *c.store_ids.iter().find(|s| **s != leader).unwrap();
    let applied_before = c
        .router(follower)
        .metrics()
        .snapshots_applied
        .load(Ordering::Relaxed);
    let fid = c.net.add_filter(IsolateStore(follower));
    for i in 0..300 {
        c.must_put(&key(i), b"x");
    }
    c.must_compact_log(1, u64::MAX);
    let leader_engine = c.engine(leader).clone();
    assert!(wait_until(Duration::from_secs(10), || {
        let s = atoll_raftstore::raft::storage::load_apply_state(&leader_engine, 1)
            .unwrap()
            .unwrap();
        s.truncated_state.unwrap().index > 100
    }));
    fail::cfg(fp, "3*return").unwrap();
    let _guard = FailGuard(fp);
    c.net.remove_filter(fid);
    for i in 0..300 {
        assert!(
            wait_until(Duration::from_secs(30), || c
                .get_on_store(follower, &key(i))
                .as_deref()
                == Some(b"x")),
            "the follower never caught up: key {i} missing (snapshot failures: {})",
            c.store_ids
                .iter()
                .map(|s| failures(c.router(*s).metrics()))
                .sum::<u64>()
        );
    }
    let failed: u64 = c
        .store_ids
        .iter()
        .map(|s| failures(c.router(*s).metrics()))
        .sum();
    assert_eq!(
        failed, 3,
        "the failpoint {fp} did not fail the snapshot 3 times"
    );
    // (The data lands in batches before the apply is reported done: wait for the report.)
    assert!(
        wait_until(Duration::from_secs(10), || c
            .router(follower)
            .metrics()
            .snapshots_applied
            .load(Ordering::Relaxed)
            > applied_before),
        "the follower did not catch up by snapshot"
    );
    // It keeps following from the log, and holds everything after a restart.
    c.must_put(b"after-snap", b"y");
    c.must_replicated(b"after-snap", b"y", Duration::from_secs(10));
    c.restart_store(follower);
    for i in 0..300 {
        assert_eq!(
            c.get_on_store(follower, &key(i)).as_deref(),
            Some(&b"x"[..])
        );
    }
    c.must_get_equal(b"after-snap", b"y");
}

/// raftstore::snap_apply: the receiver fails to apply the snapshot three times; it retries
/// (the received file is kept, the region stays `Applying`) and catches up.
#[test]
fn failed_snapshot_apply_is_retried() {
    follower_catches_up_despite_failing_snapshots(rfp::SNAP_APPLY, |m| {
        m.snapshots_apply_failed.load(Ordering::Relaxed)
    });
}

/// raftstore::snap_generate: the leader fails to build the snapshot three times; raft asks
/// again and the follower catches up.
#[test]
fn failed_snapshot_generation_is_retried() {
    follower_catches_up_despite_failing_snapshots(rfp::SNAP_GENERATE, |m| {
        m.snapshots_generate_failed.load(Ordering::Relaxed)
    });
}

// ---------------------------------------------------------------------------------------------
// PD heartbeats (raftstore::pd_region_heartbeat, pd_store_heartbeat)
// ---------------------------------------------------------------------------------------------

/// Region heartbeats dropped on every store: a region split off meanwhile reaches PD (through
/// the split report) but PD never learns its leader; once removed, PD converges. A store
/// started with its store heartbeats dropped (`FAILPOINTS`) is reported disconnected while it
/// keeps serving; removed at run time, it is up again.
#[test]
fn dropped_pd_heartbeats_go_stale_then_converge() {
    let cfg = tempfile::tempdir().unwrap();
    let store_toml = cfg.path().join("store.toml");
    std::fs::write(&store_toml, "[raftstore]\npd-heartbeat-interval = \"1s\"\n").unwrap();
    let pd_toml = cfg.path().join("pd.toml");
    std::fs::write(&pd_toml, "[schedule]\nstore-disconnect-time = \"5s\"\n").unwrap();
    let mut c = start_cluster(
        3,
        &["--config", store_toml.to_str().unwrap()],
        &["--config", pd_toml.to_str().unwrap()],
    );
    let rt = runtime();
    let cl = client(&c, &rt);
    let mut acked = BTreeMap::new();
    let put = |acked: &mut BTreeMap<String, String>, k: &str, v: &str| {
        rt.block_on(cl.put(k.as_bytes(), v.as_bytes()))
            .unwrap_or_else(|e| panic!("put {k}: {e}"));
        acked.insert(k.to_string(), v.to_string());
    };
    for i in 0..20 {
        put(&mut acked, &format!("hb/{i:02}"), "a");
        put(&mut acked, &format!("hb/z{i:02}"), "a");
    }

    // Region heartbeats dropped everywhere.
    set_on_all_stores(&c, rfp::PD_REGION_HEARTBEAT, "return");
    must_ok(&c.kvctl(&["split", "hb/m"]), "split hb/m");
    let new_region = || -> Option<Value> {
        try_json(&c, &["regions"])?["regions"]
            .as_array()?
            .iter()
            .find(|r| r["start_key"] == "hb/m")
            .cloned()
    };
    assert!(
        wait_until(Duration::from_secs(10), || new_region().is_some()),
        "PD never heard of the split"
    );
    // Three heartbeat intervals later PD still knows no leader for it (stale)...
    let stale_since = Instant::now();
    while stale_since.elapsed() < Duration::from_secs(3) {
        let r = new_region().expect("the new region");
        assert!(
            r["leader"].is_null(),
            "PD learnt the new region's leader though region heartbeats are dropped: {r}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // ...while the region serves.
    for i in 0..20 {
        put(&mut acked, &format!("hb/z{i:02}"), "b");
    }
    remove_on_all_stores(&c, rfp::PD_REGION_HEARTBEAT);
    assert!(
        wait_until(Duration::from_secs(20), || new_region()
            .is_some_and(|r| r["leader"].is_object())),
        "PD never learnt the new region's leader"
    );
    wait_healthy(&c, Duration::from_secs(30));

    // Store heartbeats dropped from the start (FAILPOINTS) on store3.
    let v = 2;
    let vid = store_id(&c, v);
    let other = store_id(&c, 0);
    c.stores[v].proc_.kill();
    c.stores[v].proc_.set_env(
        "FAILPOINTS",
        Some(format!("{}=return", rfp::PD_STORE_HEARTBEAT).as_str()),
    );
    c.stores[v].proc_.start();
    c.stores[v].proc_.set_env("FAILPOINTS", None);
    let status = c.stores[v].status_addr.clone();
    assert!(
        wait_until(Duration::from_secs(30), || procs::http(
            &status, "GET", "/fail", ""
        )
        .is_ok()),
        "store3 never served its status page"
    );
    let active = list_failpoints(&status);
    assert!(
        active
            .iter()
            .any(|(n, a)| n == rfp::PD_STORE_HEARTBEAT && a == "return"),
        "FAILPOINTS not applied at start: {active:?}"
    );
    let hb = |id: u64| pd_store(&c, id).and_then(|s| s["last_heartbeat_ms"].as_u64());
    // PD calls it disconnected once store-disconnect-time (5 s) passes without a heartbeat.
    assert!(
        wait_until(Duration::from_secs(30), || pd_store(&c, vid)
            .is_some_and(|s| s["is_down"] == true)),
        "PD never noticed the missing store heartbeats: {:?}",
        pd_store(&c, vid)
    );
    // PD reports the last heartbeat as "now minus its age": it jitters by a millisecond or
    // so between reads; a heartbeat received would move it by seconds.
    let silent_hb = hb(vid).expect("store3's last heartbeat");
    let other_hb = hb(other).unwrap_or(0);
    // Meanwhile it serves: it takes writes into its copy.
    for i in 0..20 {
        put(&mut acked, &format!("hb/{i:02}"), "c");
    }
    must_store_hold(&c, &rt, &cl, v, "hb/", "hb0", &acked);
    // Another store's heartbeat moved on; store3's did not.
    assert!(wait_until(Duration::from_secs(15), || hb(other)
        .unwrap_or(0)
        > other_hb));
    let now_hb = hb(vid).expect("store3's last heartbeat");
    assert!(
        now_hb < silent_hb + 1000,
        "store3's heartbeat moved though dropped: {silent_hb} -> {now_hb}"
    );
    // Removed at run time: PD hears from it again.
    remove_failpoint(&status, rfp::PD_STORE_HEARTBEAT);
    assert!(
        wait_until(Duration::from_secs(20), || pd_store(&c, vid)
            .is_some_and(|s| s["is_down"] == false
                && s["last_heartbeat_ms"].as_u64() > Some(silent_hb + 1000))),
        "store3 never came back in PD: {:?}",
        pd_store(&c, vid)
    );
    must_read_back(&c, "hb/", "hb0", &acked);
    for i in 0..3 {
        must_store_hold(&c, &rt, &cl, i, "hb/", "hb0", &acked);
    }
}

// ---------------------------------------------------------------------------------------------
// the network (transport::send_drop, recv_drop, send_delay)
// ---------------------------------------------------------------------------------------------

/// The store leading the most regions stops sending (send_drop), then another stops hearing
/// the other two (recv_drop with a store list), then every link gets slow (send_delay). Each
/// time the others keep serving writes, and once healed the partitioned store catches up.
#[test]
fn partitions_and_a_slow_network_lose_nothing() {
    let c = start_cluster(3, &[], &[]);
    must_split(&c, &["net/3", "net/6"]);
    let rt = runtime();
    let cl = client(&c, &rt);
    let ids: Vec<u64> = (0..3).map(|i| store_id(&c, i)).collect();
    let w = Writer::start(&rt, &cl, "net/", 4);
    w.must_progress(&c, 50, Duration::from_secs(60), "initial load");

    // transport::send_drop: everything this store sends is lost.
    let v = busiest(&c, &[0, 1, 2]);
    assert!(
        leaders_on(&c, v).unwrap_or(0) > 0,
        "no store leads anything"
    );
    set_failpoint(&c.stores[v].status_addr, SEND_DROP, "return");
    assert!(
        wait_until(Duration::from_secs(30), || leaders_on(&c, v) == Some(0)),
        "store{} kept its leaders though it cannot send",
        v + 1
    );
    w.must_progress(&c, 50, Duration::from_secs(60), "store cut off (send_drop)");
    remove_failpoint(&c.stores[v].status_addr, SEND_DROP);
    must_store_hold(&c, &rt, &cl, v, "net/", "net0", &w.acked());

    // transport::recv_drop: this store hears nothing from the two others (by id).
    let rest: Vec<usize> = (0..3).filter(|i| *i != v).collect();
    assert!(wait_until(Duration::from_secs(30), || rest
        .iter()
        .any(|i| leaders_on(&c, *i).unwrap_or(0) > 0)));
    let v2 = busiest(&c, &rest);
    let from: Vec<String> = (0..3)
        .filter(|i| *i != v2)
        .map(|i| ids[i].to_string())
        .collect();
    set_failpoint(
        &c.stores[v2].status_addr,
        RECV_DROP,
        &format!("return({})", from.join(",")),
    );
    assert!(
        wait_until(Duration::from_secs(30), || leaders_on(&c, v2) == Some(0)),
        "store{} kept its leaders though it hears nobody",
        v2 + 1
    );
    w.must_progress(&c, 50, Duration::from_secs(60), "store deaf (recv_drop)");
    remove_failpoint(&c.stores[v2].status_addr, RECV_DROP);
    must_store_hold(&c, &rt, &cl, v2, "net/", "net0", &w.acked());

    // transport::send_delay: every flush on every store waits 200 ms.
    let latency = |tag: &str| -> Duration {
        (0..5)
            .map(|i| {
                let k = format!("net/lat-{tag}-{i}");
                let t = Instant::now();
                rt.block_on(cl.put(k.as_bytes(), b"l"))
                    .unwrap_or_else(|e| panic!("put {k}: {e}"));
                t.elapsed()
            })
            .min()
            .unwrap()
    };
    let fast = latency("fast");
    set_on_all_stores(&c, SEND_DELAY, "return(200)");
    let slow = latency("slow");
    eprintln!("put latency: {fast:?} without delay, {slow:?} with 200 ms per flush");
    assert!(
        slow >= Duration::from_millis(200) && slow > fast,
        "a 200 ms delay per flush did not slow writes: {fast:?} -> {slow:?}"
    );
    w.must_progress(&c, 20, Duration::from_secs(60), "slow network");
    remove_on_all_stores(&c, SEND_DELAY);
    w.must_progress(&c, 50, Duration::from_secs(60), "healed");

    let mut acked = w.stop(&rt);
    for tag in ["fast", "slow"] {
        for i in 0..5 {
            acked.insert(format!("net/lat-{tag}-{i}"), "l".into());
        }
    }
    must_read_back(&c, "net/", "net0", &acked);
    for i in 0..3 {
        must_store_hold(&c, &rt, &cl, i, "net/", "net0", &acked);
    }
}

// ---------------------------------------------------------------------------------------------
// commands (storage::before_plain_write, after_write_applied; txn::prewrite, txn::commit)
// ---------------------------------------------------------------------------------------------

/// Waits until no store's copy holds a lock in `[start, end)`.
fn must_have_no_locks(
    c: &ProcCluster,
    rt: &tokio::runtime::Runtime,
    cl: &Client,
    start: &str,
    end: &str,
) {
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(30), || {
        (0..c.stores.len()).all(|i| {
            let id = store_id(c, i);
            match rt.block_on(store_locks(
                cl,
                id,
                &c.stores[i].addr,
                start.as_bytes(),
                end.as_bytes(),
            )) {
                Ok(l) if l.is_empty() => true,
                Ok(l) => {
                    last = format!("store{}: {l:?}", i + 1);
                    false
                }
                Err(e) => {
                    last = e;
                    false
                }
            }
        })
    });
    assert!(ok, "locks left in [{start}, {end}): {last}");
}

/// The locks store1's copy holds in `[start, end)` (waiting until there are `n`).
fn must_have_locks(
    c: &ProcCluster,
    rt: &tokio::runtime::Runtime,
    cl: &Client,
    start: &str,
    end: &str,
    n: usize,
) -> Vec<kvrpcpb::LockInfo> {
    let id = store_id(c, 0);
    let mut locks = vec![];
    let ok = wait_until(Duration::from_secs(10), || {
        match rt.block_on(store_locks(
            cl,
            id,
            &c.stores[0].addr,
            start.as_bytes(),
            end.as_bytes(),
        )) {
            Ok(l) => {
                locks = l;
                locks.len() == n
            }
            Err(_) => false,
        }
    });
    assert!(
        ok,
        "expected {n} locks in [{start}, {end}), found {locks:?}"
    );
    locks
}

/// Reads `keys` until none is visible and the locks in `[start, end)` are gone from store1's
/// copy (readers roll an abandoned transaction back once its lock TTL is over), then checks
/// that no store holds a lock there.
fn must_roll_back(
    c: &ProcCluster,
    rt: &tokio::runtime::Runtime,
    cl: &Client,
    keys: &[&str],
    start: &str,
    end: &str,
) {
    let id = store_id(c, 0);
    let ok = wait_until(Duration::from_secs(30), || {
        keys.iter().all(|k| kv_get(c, k).is_none())
            && rt
                .block_on(store_locks(
                    cl,
                    id,
                    &c.stores[0].addr,
                    start.as_bytes(),
                    end.as_bytes(),
                ))
                .is_ok_and(|l| l.is_empty())
    });
    assert!(ok, "the locks of {keys:?} were never resolved");
    must_have_no_locks(c, rt, cl, start, end);
    for k in keys {
        assert_eq!(
            kv_get(c, k),
            None,
            "{k}: part of a rolled back transaction is visible"
        );
    }
}

/// Plain writes refused at the last moment fail cleanly and write nothing; plain writes whose
/// answer is lost are retried by the client and applied once (a compare-and-swap still
/// reports success); transactions whose prewrite or primary commit fails end all rolled back.
#[test]
fn failing_writes_and_txn_commands_stay_all_or_nothing() {
    let c = start_cluster(3, &[], &[]);
    must_split(&c, &["t/m"]);
    let rt = runtime();
    let cl = client(&c, &rt);
    let mut acked: BTreeMap<String, String> = BTreeMap::new();

    // storage::before_plain_write: refused, cleanly, and nothing written.
    set_on_all_stores(&c, BEFORE_PLAIN_WRITE, "return");
    let o = c.kvctl(&["put", "t/refused", "1"]);
    assert_clean_failure(&o, "put while plain writes are refused");
    assert!(
        err_str(&o).contains("plain write refused"),
        "{}",
        err_str(&o)
    );
    assert_clean_failure(&c.kvctl(&["cas", "t/refused", "1"]), "cas while refused");
    remove_on_all_stores(&c, BEFORE_PLAIN_WRITE);
    assert_eq!(kv_get(&c, "t/refused"), None, "a refused write was applied");
    must_ok(&c.kvctl(&["put", "t/refused", "2"]), "put after removal");
    acked.insert("t/refused".into(), "2".into());

    // storage::after_write_applied: every first answer is lost after the write applied.
    must_ok(&c.kvctl(&["put", "t/cas", "1"]), "put t/cas");
    set_on_all_stores(&c, AFTER_WRITE_APPLIED, "return");
    let lost_before = cl.stats().region_errors;
    let (swapped, prev) = rt
        .block_on(cl.compare_and_swap(b"t/cas", Some(&b"1"[..]), Some(&b"2"[..])))
        .expect("cas with lost answers");
    assert!(
        cl.stats().region_errors > lost_before,
        "no answer was lost: the failpoint did not fire"
    );
    assert!(
        swapped,
        "a retried compare-and-swap reported failure (applied twice?)"
    );
    assert_eq!(prev.as_deref(), Some(&b"1"[..]));
    must_ok(
        &c.kvctl(&["cas", "t/cas", "3", "--expected", "2"]),
        "kvctl cas with lost answers",
    );
    must_ok(
        &c.kvctl(&["put", "t/lost", "1"]),
        "kvctl put with lost answers",
    );
    // A split whose answer is lost: the retry finds it done, and that is success.
    must_ok(
        &c.kvctl(&["split", "t/lost-split"]),
        "kvctl split with lost answers",
    );
    remove_on_all_stores(&c, AFTER_WRITE_APPLIED);
    assert!(
        region_of(&c, "t/lost-split").is_some_and(|r| r["start_key"] == "t/lost-split"),
        "the split with a lost answer did not happen"
    );
    assert_eq!(kv_get(&c, "t/cas").as_deref(), Some("3"));
    acked.insert("t/cas".into(), "3".into());
    acked.insert("t/lost".into(), "1".into());

    // txn::prewrite: a transaction over two regions fails and leaves nothing.
    set_on_all_stores(&c, PREWRITE, "return");
    let o = c.kvctl(&["txn", "put", "t/a1", "1", "put", "t/z1", "1"]);
    assert_clean_failure(&o, "txn while prewrite fails");
    assert!(err_str(&o).contains(PREWRITE), "{}", err_str(&o));
    remove_on_all_stores(&c, PREWRITE);
    assert_eq!(kv_get(&c, "t/a1"), None);
    assert_eq!(kv_get(&c, "t/z1"), None);
    must_have_no_locks(&c, &rt, &cl, "t/", "t0");
    must_ok(
        &c.kvctl(&["txn", "put", "t/a1", "1", "put", "t/z1", "1"]),
        "txn after removal",
    );
    acked.insert("t/a1".into(), "1".into());
    acked.insert("t/z1".into(), "1".into());

    // txn::commit (once per store): the primary's commit fails; the transaction fails with
    // its locks left; they expire and readers roll it back: neither key ever appears.
    set_on_all_stores(&c, COMMIT, "1*return");
    let o = c.kvctl(&["txn", "put", "t/a2", "2", "put", "t/z2", "2"]);
    assert_clean_failure(&o, "txn while commit fails");
    assert!(err_str(&o).contains(COMMIT), "{}", err_str(&o));
    remove_on_all_stores(&c, COMMIT);
    let locks = must_have_locks(&c, &rt, &cl, "t/", "t0", 2);
    assert!(locks.iter().all(|l| l.primary_lock == b"t/a2"), "{locks:?}");
    must_roll_back(&c, &rt, &cl, &["t/a2", "t/z2"], "t/", "t0");
    must_ok(
        &c.kvctl(&["txn", "put", "t/a2", "3", "put", "t/z2", "3"]),
        "txn after removal",
    );
    acked.insert("t/a2".into(), "3".into());
    acked.insert("t/z2".into(), "3".into());

    must_read_back(&c, "t/", "t0", &acked);
    for i in 0..3 {
        must_store_hold(&c, &rt, &cl, i, "t/", "t0", &acked);
    }
}

// ---------------------------------------------------------------------------------------------
// a dying client (client::txn_after_prewrite, client::txn_after_primary_commit)
// ---------------------------------------------------------------------------------------------

/// kvctl dies (the failpoint panics in it) right after prewriting a two-region transaction:
/// its locks stay; the next readers roll it back once the lock TTL (3 s) passed, and neither
/// key appears. Dying right after the primary commit: the readers commit the rest.
#[test]
fn client_dying_mid_commit_leaves_locks_readers_resolve() {
    let c = start_cluster(3, &[], &[]);
    must_split(&c, &["cl/y"]);
    let rt = runtime();
    let cl = client(&c, &rt);
    let pd = c.pd_endpoints();
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let dying_txn = |fp: &str, action: &str, x: &str, y: &str, v: &str| -> Output {
        let spec = format!("{fp}={action}");
        procs::kvctl_env(
            &pd,
            &["txn", "put", x, v, "put", y, v],
            &[("FAILPOINTS", spec.as_str())],
        )
    };

    // client::txn_after_prewrite=panic: the client dies with both keys locked.
    let o = dying_txn(CLIENT_AFTER_PREWRITE, "panic", "cl/x1", "cl/y1", "v1");
    let died = Instant::now();
    assert_eq!(o.status.code(), Some(101), "kvctl did not die: {o:?}");
    assert!(
        err_str(&o).contains(&format!("failpoint {CLIENT_AFTER_PREWRITE} panic")),
        "{}",
        err_str(&o)
    );
    let locks = must_have_locks(&c, &rt, &cl, "cl/", "cl0", 2);
    assert!(
        locks.iter().all(|l| l.primary_lock == b"cl/x1"),
        "{locks:?}"
    );
    // Readers see neither key (they push past the locks) and, once the TTL is over, roll the
    // transaction back and clean its locks.
    must_roll_back(&c, &rt, &cl, &["cl/x1", "cl/y1"], "cl/", "cl0");
    assert!(
        died.elapsed() >= Duration::from_secs(2),
        "locks resolved after {:?}, before their TTL",
        died.elapsed()
    );
    must_ok(
        &c.kvctl(&["txn", "put", "cl/x1", "v2", "put", "cl/y1", "v2"]),
        "txn on the keys the dead client locked",
    );
    acked.insert("cl/x1".into(), "v2".into());
    acked.insert("cl/y1".into(), "v2".into());

    // client::txn_after_primary_commit=panic: committed at the primary; the secondary's lock
    // stays until a reader commits it.
    let o = dying_txn(CLIENT_AFTER_PRIMARY_COMMIT, "panic", "cl/x2", "cl/y2", "w");
    assert_eq!(o.status.code(), Some(101), "kvctl did not die: {o:?}");
    assert!(
        err_str(&o).contains(&format!("failpoint {CLIENT_AFTER_PRIMARY_COMMIT} panic")),
        "{}",
        err_str(&o)
    );
    let locks = must_have_locks(&c, &rt, &cl, "cl/", "cl0", 1);
    assert_eq!(locks[0].key, b"cl/y2", "{locks:?}");
    assert_eq!(kv_get(&c, "cl/y2").as_deref(), Some("w"));
    assert_eq!(kv_get(&c, "cl/x2").as_deref(), Some("w"));
    must_have_no_locks(&c, &rt, &cl, "cl/", "cl0");
    acked.insert("cl/x2".into(), "w".into());
    acked.insert("cl/y2".into(), "w".into());

    // The `return` action: kvctl stops after prewrite with a clean error; rolled back too.
    let o = dying_txn(CLIENT_AFTER_PREWRITE, "return", "cl/x3", "cl/y3", "u");
    assert_clean_failure(&o, "txn stopped after prewrite");
    must_have_locks(&c, &rt, &cl, "cl/", "cl0", 2);
    must_roll_back(&c, &rt, &cl, &["cl/x3", "cl/y3"], "cl/", "cl0");

    must_read_back(&c, "cl/", "cl0", &acked);
    for i in 0..3 {
        must_store_hold(&c, &rt, &cl, i, "cl/", "cl0", &acked);
    }
}

// ---------------------------------------------------------------------------------------------
// PD's timestamp oracle (pd::tso_alloc, pd::tso_save)
// ---------------------------------------------------------------------------------------------

/// With allocation failing, `kvctl tso` fails cleanly; with the window save failing, PD stops
/// serving once its persisted window runs out (and a restarted PD serves nothing until it can
/// persist one: FAILPOINTS at start, removed at run time); timestamps strictly increase
/// across every fault.
#[test]
fn tso_failpoints_fail_cleanly_and_time_never_goes_back() {
    let mut c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores: 0,
        ..Default::default()
    });
    let tso = |c: &ProcCluster| -> Result<u64, Output> {
        let o = c.kvctl(&["--timeout", "2", "--output", "json", "tso"]);
        if !o.status.success() {
            return Err(o);
        }
        let v: Value = serde_json::from_slice(&o.stdout).expect("tso json");
        Ok(v["ts"].as_u64().expect("ts"))
    };
    let mut seen: Vec<u64> = vec![];
    assert!(
        wait_until(Duration::from_secs(60), || tso(&c).is_ok()),
        "PD never served timestamps"
    );
    for _ in 0..3 {
        seen.push(tso(&c).expect("tso"));
    }
    let status = c.pds[0].status_addr.clone();

    // pd::tso_alloc
    set_failpoint(&status, TSO_ALLOC, "return");
    let t = Instant::now();
    let o = tso(&c).expect_err("tso while allocation fails");
    assert_clean_failure(&o, "tso while allocation fails");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    remove_failpoint(&status, TSO_ALLOC);
    seen.push(tso(&c).expect("tso after removal"));

    // pd::tso_save: served from the persisted window until it runs out (save-interval 3 s).
    set_failpoint(&status, TSO_SAVE, "return");
    let mut last_err = None;
    let ran_out = wait_until(Duration::from_secs(20), || match tso(&c) {
        Ok(t) => {
            seen.push(t);
            false
        }
        Err(o) => {
            last_err = Some(o);
            true
        }
    });
    assert!(
        ran_out,
        "PD kept serving timestamps though it cannot persist its window"
    );
    assert_clean_failure(&last_err.unwrap(), "tso once the window ran out");
    assert!(tso(&c).is_err(), "a timestamp beyond the persisted window");
    remove_failpoint(&status, TSO_SAVE);
    assert!(wait_until(Duration::from_secs(20), || match tso(&c) {
        Ok(t) => {
            seen.push(t);
            true
        }
        Err(_) => false,
    }));

    // Restarted with pd::tso_save failing from the start: a new leader must persist its window
    // before serving anything.
    c.pds[0].proc_.kill();
    c.pds[0]
        .proc_
        .set_env("FAILPOINTS", Some(format!("{TSO_SAVE}=return").as_str()));
    c.pds[0].proc_.start();
    c.pds[0].proc_.set_env("FAILPOINTS", None);
    assert!(
        wait_until(Duration::from_secs(30), || status_json(&status)
            .is_some_and(|s| s["is_leader"] == true)),
        "restarted PD never led"
    );
    let active = list_failpoints(&status);
    assert!(
        active.iter().any(|(n, _)| n == TSO_SAVE),
        "FAILPOINTS not applied at start: {active:?}"
    );
    for _ in 0..2 {
        let o = tso(&c).expect_err("a timestamp from a leader that persisted no window");
        assert_clean_failure(&o, "tso before the window is saved");
    }
    remove_failpoint(&status, TSO_SAVE);
    assert!(wait_until(Duration::from_secs(20), || match tso(&c) {
        Ok(t) => {
            seen.push(t);
            true
        }
        Err(_) => false,
    }));
    for _ in 0..3 {
        seen.push(tso(&c).expect("tso"));
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "timestamps went back across the faults: {seen:?}"
    );
}

/// Resident memory of a process, from `/proc/PID/status`.
fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Apply flow control: a follower whose apply stalls (`raftstore::before_apply` paused on its
/// store) under a write flood leaves the committed entries it cannot apply in its raft log (on
/// disk) instead of queueing them in memory: its resident memory stays flat while the flood
/// writes far more than it holds, and it catches up once apply runs again.
#[test]
fn slow_apply_under_a_write_flood_keeps_memory_flat() {
    // No balancing: leadership must not move onto the store whose apply stalls (a leader
    // that cannot apply cannot acknowledge writes; that is not what is measured here).
    let dir = tempfile::tempdir().unwrap();
    let pd_cfg = dir.path().join("pd.toml");
    std::fs::write(&pd_cfg, "[schedule]\nenable-balance = false\n").unwrap();
    let c = start_cluster(3, &[], &["--config", pd_cfg.to_str().unwrap()]);
    let lead = busiest(&c, &[0, 1, 2]);
    let slow = (0..3).find(|i| *i != lead).expect("a follower");
    let pid = c.stores[slow].proc_.pid().expect("running");
    const VALUE: usize = 64 << 10;
    let value = VALUE.to_string();
    // Warm up (memtables, connections) before the baseline.
    must_ok(
        &c.kvctl(&[
            "bench",
            "put",
            "--clients",
            "8",
            "--duration",
            "3",
            "--value-size",
            &value,
        ]),
        "warm-up",
    );
    let base = rss_bytes(pid).expect("rss");
    set_failpoint(&c.stores[slow].status_addr, rfp::BEFORE_APPLY, "pause");
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut max = 0;
            while !stop.load(Ordering::Relaxed) {
                max = max.max(rss_bytes(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(200));
            }
            max
        })
    };
    let out = c.kvctl(&[
        "bench",
        "put",
        "--clients",
        "32",
        "--duration",
        "30",
        "--value-size",
        &value,
        "--keys",
        "2000",
    ]);
    must_ok(&out, "flood");
    let pending = procs::metric_sum(&c.stores[slow].status_addr, "atoll_apply_pending_bytes");
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().expect("sampler");
    let bench: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let ops = bench["ops"].as_u64().unwrap_or(0);
    let written = ops * VALUE as u64;
    let grew = peak.saturating_sub(base);
    eprintln!(
        "flood of {ops} puts of 64 KiB ({} MiB) with the follower's apply stalled: its RSS {} MiB -> peak {} MiB (+{} MiB); apply pending at the end {:?} bytes",
        written >> 20,
        base >> 20,
        peak >> 20,
        grew >> 20,
        pending
    );
    assert!(
        written > 300 << 20,
        "the flood was too small to show anything ({} MiB)",
        written >> 20
    );
    assert!(
        grew < written / 2,
        "the stalled follower's memory grew by {} MiB for {} MiB written",
        grew >> 20,
        written >> 20
    );
    assert!(
        pending.unwrap_or(0.0) <= (256u64 << 20) as f64,
        "apply pending past the store limit: {pending:?}"
    );
    // Apply runs again: it catches up (a write made now is soon in its own copy).
    remove_failpoint(&c.stores[slow].status_addr, rfp::BEFORE_APPLY);
    must_ok(&c.kvctl(&["put", "after-flood", "caught-up"]), "put after");
    let rt = runtime();
    let cl = client(&c, &rt);
    let mut acked = BTreeMap::new();
    acked.insert("after-flood".to_string(), "caught-up".to_string());
    must_store_hold(&c, &rt, &cl, slow, "after-flood", "after-flood\0", &acked);
}
