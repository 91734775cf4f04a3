//! Idle clusters stay idle: hibernating regions neither churn nor burn CPU, even with more
//! stores than replicas and with a store down.
//!
//! - `idle_regions_do_not_churn_with_more_stores_than_replicas`: 1 PD + 4 stores, 40 regions,
//!   settled, then `ATOLL_IDLE_SECS` (default 180) idle: no membership change, no leader
//!   change, no operator. (A sleeping leader used to report every follower down after 30 s of
//!   silence it caused itself, and PD replaced them at once.)
//! - `hibernation_survives_a_down_store`: 1 PD + 3 stores, 1,000 regions, one store killed:
//!   the survivors elect where needed, then sleep (each under 5% of one core over 30 s), and
//!   wake for writes.
//!
//! These run one at a time: they measure CPU and count changes.

use atoll_tests::procs::{
    cpu_fractions, metric_sum, regions_healthy, status_json, ClusterOpts, ProcCluster,
};
use atoll_tests::wait_until;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

fn regions(c: &ProcCluster) -> Option<Value> {
    let o = c.kvctl(&["--output", "json", "--timeout", "10", "regions"]);
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

/// region id -> (conf_ver, version, leader peer id)
fn shape(v: &Value) -> BTreeMap<u64, (u64, u64, Option<u64>)> {
    v["regions"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    (
                        r["id"].as_u64().unwrap_or(0),
                        (
                            r["epoch"]["conf_ver"].as_u64().unwrap_or(0),
                            r["epoch"]["version"].as_u64().unwrap_or(0),
                            r["leader"]["id"].as_u64(),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn operators(c: &ProcCluster) -> f64 {
    metric_sum(&c.pds[0].status_addr, "atoll_pd_operators_created_total").unwrap_or(0.0)
}

fn awake(c: &ProcCluster, i: usize) -> Option<u64> {
    status_json(&c.stores[i].status_addr).and_then(|v| v["awake_regions"].as_u64())
}

/// Splits the key space into `n` regions (split keys `k0001`...), in chunks.
fn split_into(c: &ProcCluster, n: usize) {
    let keys: Vec<String> = (1..n).map(|i| format!("k{i:05}")).collect();
    for chunk in keys.chunks(250) {
        let mut args = vec!["--timeout", "60", "split"];
        args.extend(chunk.iter().map(String::as_str));
        let ok = wait_until(Duration::from_secs(120), || c.kvctl(&args).status.success());
        assert!(ok, "split of {} keys kept failing", chunk.len());
    }
}

fn wait_healthy(c: &ProcCluster, n: usize, replicas: usize, timeout: Duration) {
    let ok = wait_until(timeout, || {
        regions(c).is_some_and(|v| {
            v["regions"].as_array().is_some_and(|r| r.len() == n) && regions_healthy(&v, replicas)
        })
    });
    if !ok {
        c.dump_logs();
    }
    assert!(ok, "{n} regions never became healthy");
}

/// No new operator for `quiet` and every store's regions asleep.
fn wait_settled(c: &ProcCluster, stores: &[usize], quiet: Duration, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last_ops = operators(c);
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let ops = operators(c);
        if ops != last_ops {
            last_ops = ops;
            since = Instant::now();
        }
        let asleep = stores.iter().all(|i| awake(c, *i) == Some(0));
        if asleep && since.elapsed() >= quiet {
            return;
        }
        if Instant::now() > deadline {
            c.dump_logs();
            panic!(
                "never settled: operators {ops}, awake regions {:?}",
                stores.iter().map(|i| awake(c, *i)).collect::<Vec<_>>()
            );
        }
    }
}

#[test]
fn idle_regions_do_not_churn_with_more_stores_than_replicas() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let idle = Duration::from_secs(
        std::env::var("ATOLL_IDLE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(180),
    );
    let c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores: 4,
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(60));
    split_into(&c, 40);
    wait_healthy(&c, 40, 3, Duration::from_secs(120));
    wait_settled(
        &c,
        &[0, 1, 2, 3],
        Duration::from_secs(20),
        Duration::from_secs(240),
    );
    let before = shape(&regions(&c).expect("regions"));
    let ops_before = operators(&c);
    let pids: Vec<u32> = c
        .stores
        .iter()
        .filter_map(|s| s.proc_.pid())
        .chain(c.pds[0].proc_.pid())
        .collect();
    let cpu = cpu_fractions(&pids, idle);
    let after = shape(&regions(&c).expect("regions"));
    let ops = operators(&c) - ops_before;
    let conf_sum =
        |m: &BTreeMap<u64, (u64, u64, Option<u64>)>| m.values().map(|v| v.0).sum::<u64>();
    let leader_changes = before
        .iter()
        .filter(|(id, v)| after.get(id).map(|a| a.2) != Some(v.2))
        .count();
    eprintln!(
        "1 PD + 4 stores, 40 regions, {idle:?} idle: sum of conf_ver {} -> {}, leader changes {leader_changes}, operators {ops}, awake regions {:?}, CPU (% of a core) stores {:?} PD {:.2}",
        conf_sum(&before),
        conf_sum(&after),
        (0..4).map(|i| awake(&c, i)).collect::<Vec<_>>(),
        cpu[..4].iter().map(|f| format!("{:.2}", f * 100.0)).collect::<Vec<_>>(),
        cpu[4] * 100.0
    );
    assert_eq!(before.len(), 40);
    assert_eq!(
        before, after,
        "idle regions changed (membership, splits or leaders)"
    );
    assert_eq!(ops, 0.0, "PD started {ops} operators on an idle cluster");
}

#[test]
fn hibernation_survives_a_down_store() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores: 3,
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(60));
    let n: usize = std::env::var("ATOLL_REGIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    split_into(&c, n);
    wait_healthy(&c, n, 3, Duration::from_secs(240));
    wait_settled(
        &c,
        &[0, 1, 2],
        Duration::from_secs(10),
        Duration::from_secs(240),
    );
    let killed_at = Instant::now();
    c.stores[2].proc_.kill();
    // The survivors notice the dead store, elect where it led, then everything sleeps again.
    let leaders = |c: &ProcCluster| -> u64 {
        (0..2)
            .filter_map(|i| {
                status_json(&c.stores[i].status_addr).and_then(|v| v["leaders"].as_u64())
            })
            .sum()
    };
    let settled = wait_until(Duration::from_secs(120), || {
        leaders(&c) == n as u64 && awake(&c, 0) == Some(0) && awake(&c, 1) == Some(0)
    });
    let settle_time = killed_at.elapsed();
    if !settled {
        c.dump_logs();
        if let Ok(d) = std::env::var("ATOLL_SAVE_LOGS") {
            let _ = std::process::Command::new("cp")
                .args(["-r", &c.path().display().to_string(), &d])
                .status();
        }
        panic!(
            "survivors never settled: {} of {n} regions led, awake {:?} {:?}",
            leaders(&c),
            awake(&c, 0),
            awake(&c, 1)
        );
    }
    let pids: Vec<u32> = c.stores[..2].iter().filter_map(|s| s.proc_.pid()).collect();
    let cpu = cpu_fractions(&pids, Duration::from_secs(30));
    let awake_after = [awake(&c, 0), awake(&c, 1)];
    eprintln!(
        "{n} regions, store 3 killed: every region led by a survivor and all asleep {settle_time:?} after the kill; CPU over 30 s (% of a core) {:?}; awake regions after {awake_after:?}",
        cpu.iter().map(|f| format!("{:.2}", f * 100.0)).collect::<Vec<_>>()
    );
    for (i, f) in cpu.iter().enumerate() {
        assert!(
            *f < 0.05,
            "survivor {i} used {:.1}% of a core while idle",
            f * 100.0
        );
    }
    // They wake for writes (regions formerly led by the dead store included).
    let t0 = Instant::now();
    for i in (0..n).step_by((n / 20).max(1)) {
        let key = format!("k{i:05}x");
        let o = c.kvctl(&["--timeout", "20", "put", &key, "v"]);
        if !o.status.success() {
            c.dump_logs();
        }
        assert!(
            o.status.success(),
            "put {key} after the kill: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    eprintln!("20 writes to sleeping regions took {:?}", t0.elapsed());
}
