//! PD high availability, TSO, scale-out and decommission (issue: PD HA and elastic scaling),
//! with real processes.

use atoll_tests::procs::{ClusterOpts, ProcCluster};
use atoll_tests::wait_until;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn client(c: &ProcCluster, rt: &tokio::runtime::Runtime) -> Arc<atoll_client::Client> {
    let mut cfg =
        atoll_client::ClientConfig::new(atoll_pd_client::rpc::parse_endpoints(&c.pd_endpoints()));
    cfg.timeout = Duration::from_secs(30);
    cfg.rpc_timeout = Duration::from_secs(2);
    rt.block_on(atoll_client::Client::connect(cfg))
        .expect("client")
}

fn pd_leader(c: &ProcCluster) -> Option<usize> {
    let o = c.kvctl(&["--output", "json", "--timeout", "2", "members"]);
    if !o.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&o.stdout).ok()?;
    let addr = v["members"]
        .as_array()?
        .iter()
        .find(|m| m["is_leader"] == true)?["client_addr"]
        .as_str()?
        .to_string();
    c.pds.iter().position(|p| p.client_addr == addr)
}

fn tso(c: &ProcCluster) -> Option<u64> {
    let o = c.kvctl(&["--output", "json", "--timeout", "3", "tso"]);
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice::<Value>(&o.stdout).ok()?["ts"].as_u64()
}

struct Writer {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    last_ok_ms: Arc<AtomicU64>,
    first_error: Arc<parking_lot::Mutex<Option<String>>>,
    handles: Vec<tokio::task::JoinHandle<()>>,
    start: Instant,
}

impl Writer {
    fn spawn(
        rt: &tokio::runtime::Runtime,
        cl: Arc<atoll_client::Client>,
        tasks: usize,
        prefix: &'static str,
    ) -> Writer {
        let w = Writer {
            stop: Arc::new(AtomicBool::new(false)),
            ok: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(AtomicU64::new(0)),
            last_ok_ms: Arc::new(AtomicU64::new(0)),
            first_error: Arc::new(parking_lot::Mutex::new(None)),
            handles: vec![],
            start: Instant::now(),
        };
        let mut handles = vec![];
        for t in 0..tasks {
            let (cl, stop, ok, failed, last, fe, start) = (
                cl.clone(),
                w.stop.clone(),
                w.ok.clone(),
                w.failed.clone(),
                w.last_ok_ms.clone(),
                w.first_error.clone(),
                w.start,
            );
            handles.push(rt.spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let k = format!("{prefix}{:03}-{t}-{i}", i % 100);
                    match cl.put(k.as_bytes(), b"v").await {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            fe.lock().get_or_insert_with(|| e.to_string());
                        }
                    }
                    i += 1;
                }
            }));
        }
        Writer { handles, ..w }
    }

    fn finish(self, rt: &tokio::runtime::Runtime) -> (u64, u64, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            let _ = rt.block_on(h);
        }
        let e = self.first_error.lock().clone();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            e,
        )
    }
}

#[test]
fn pd_leader_failover_keeps_serving_and_tso_grows() {
    let mut c = ProcCluster::start(ClusterOpts {
        pds: 3,
        stores: 3,
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(90));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cl = client(&c, &rt);
    let w = Writer::spawn(&rt, cl.clone(), 4, "pdha/");
    let mut last_ts = tso(&c).expect("tso");
    for round in 0..5 {
        std::thread::sleep(Duration::from_secs(2));
        let leader = loop {
            if let Some(l) = pd_leader(&c) {
                break l;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let before = tso(&c).expect("tso before");
        assert!(
            before > last_ts,
            "round {round}: tso went back: {before} <= {last_ts}"
        );
        let killed_at = Instant::now();
        c.pds[leader].proc_.kill();
        // A new leader within 5 s.
        let elected = wait_until(Duration::from_secs(5), || {
            pd_leader(&c).is_some_and(|l| l != leader)
        });
        let took = killed_at.elapsed();
        assert!(elected, "round {round}: no new PD leader within 5 s");
        // Writes succeed again within 10 s (after the kill).
        let kill_ms = (killed_at - w.start).as_millis() as u64;
        let resumed = wait_until(Duration::from_secs(10), || {
            w.last_ok_ms.load(Ordering::Relaxed) > kill_ms + 50
        });
        assert!(resumed, "round {round}: writes did not resume within 10 s");
        let after = tso(&c).expect("tso after");
        assert!(
            after > before,
            "round {round}: tso after failover {after} <= before {before}"
        );
        eprintln!("round {round}: killed PD member {leader}; new leader after {took:?}; tso {before} -> {after}");
        last_ts = after;
        c.pds[leader].proc_.start();
    }
    let (ok, failed, e) = w.finish(&rt);
    eprintln!("writes during 5 PD failovers: {ok} ok, {failed} failed ({e:?})");
    assert!(ok > 100);
}

fn store_counts(c: &ProcCluster) -> Vec<(u64, u64, u64, String)> {
    let v = c.kvctl_json(&["stores"]);
    v["stores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_u64().unwrap(),
                s["region_count"].as_u64().unwrap(),
                s["leader_count"].as_u64().unwrap(),
                s["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn within(values: &[u64], frac: f64) -> bool {
    let mean = values.iter().sum::<u64>() as f64 / values.len() as f64;
    values
        .iter()
        .all(|v| (*v as f64 - mean).abs() <= (mean * frac).max(1.0))
}

fn regions_on(c: &ProcCluster) -> Vec<Value> {
    c.kvctl_json(&["regions"])["regions"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn scale_out_then_decommission_without_failed_requests() {
    let mut c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores: 3,
        pd_args: vec![],
        store_args: vec![],
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(60));
    // 36 regions.
    let keys: Vec<String> = (1..36).map(|i| format!("sc/{i:03}")).collect();
    let mut args = vec!["split"];
    args.extend(keys.iter().map(|s| s.as_str()));
    let o = c.kvctl(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(wait_until(Duration::from_secs(60), || regions_on(&c)
        .iter()
        .all(|r| r["peers"].as_array().unwrap().len() == 3)
        && regions_on(&c).len() >= 36));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cl = client(&c, &rt);
    // Data to read back later.
    for i in 0..360 {
        rt.block_on(cl.put(
            format!("sc/{:03}/k{i}", i % 36).as_bytes(),
            format!("v{i}").as_bytes(),
        ))
        .unwrap();
    }
    let w = Writer::spawn(&rt, cl.clone(), 4, "sc/");
    // Scale out.
    let started = Instant::now();
    let idx = c.add_store();
    let balanced = wait_until(Duration::from_secs(120), || {
        let s = store_counts(&c);
        if s.len() != 4 {
            return false;
        }
        let regions: Vec<u64> = s.iter().map(|x| x.1).collect();
        let leaders: Vec<u64> = s.iter().map(|x| x.2).collect();
        within(&regions, 0.2) && within(&leaders, 0.2)
    });
    eprintln!(
        "after scale-out ({:?}): {:?}",
        started.elapsed(),
        store_counts(&c)
    );
    assert!(
        balanced,
        "not balanced within 120 s: {:?}",
        store_counts(&c)
    );
    // Decommission one of the original stores.
    let victim = c.store_id_of(0).unwrap();
    let o = c.kvctl(&["store", "delete", &victim.to_string()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let started = Instant::now();
    let done = wait_until(Duration::from_secs(180), || {
        let s = store_counts(&c);
        let v = s.iter().find(|x| x.0 == victim).cloned();
        v.is_some_and(|v| v.3 == "tombstone" && v.1 == 0)
            && regions_on(&c).iter().all(|r| {
                let p = r["peers"].as_array().unwrap();
                let stores: HashSet<u64> =
                    p.iter().map(|x| x["store_id"].as_u64().unwrap()).collect();
                p.len() == 3 && stores.len() == 3 && !stores.contains(&victim)
            })
    });
    eprintln!(
        "decommission took {:?}: {:?}",
        started.elapsed(),
        store_counts(&c)
    );
    assert!(
        done,
        "store {victim} not drained within 180 s: {:?}",
        store_counts(&c)
    );
    c.stores[0].proc_.terminate(Duration::from_secs(10));
    let (ok, failed, e) = w.finish(&rt);
    eprintln!("writes during rebalancing and decommission: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "a request failed: {e:?}");
    for i in 0..360 {
        let v = rt
            .block_on(cl.get(format!("sc/{:03}/k{i}", i % 36).as_bytes()))
            .unwrap();
        assert_eq!(v.as_deref(), Some(format!("v{i}").as_bytes()));
    }
    let _ = idx;
    let _ = HashMap::<u8, u8>::new();
}

/// How long a newly elected PD leader takes to serve routing with 100,000 regions in its
/// state (a benchmark, printed; the assertion is a loose bound).
#[test]
fn pd_failover_with_100k_regions_serves_routing_at_once() {
    let n: u64 = std::env::var("ATOLL_PD_BENCH_REGIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<(u16, u16)> = (0..3)
        .map(|_| {
            (
                atoll_tests::procs::free_port(),
                atoll_tests::procs::free_port(),
            )
        })
        .collect();
    let initial = ports
        .iter()
        .enumerate()
        .map(|(i, (_, p))| format!("pd{}=127.0.0.1:{p}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut servers = vec![];
    for (i, (c, p)) in ports.iter().enumerate() {
        let cfg = atoll_pd::PdConfig {
            name: format!("pd{}", i + 1),
            data_dir: dir.path().join(format!("pd{}", i + 1)),
            client_addr: format!("127.0.0.1:{c}"),
            peer_addr: format!("127.0.0.1:{p}"),
            initial_cluster: initial.clone(),
            ..Default::default()
        };
        servers.push(Some(rt.block_on(atoll_pd::PdServer::start(cfg)).unwrap()));
    }
    fn leader(servers: &[Option<atoll_pd::PdServer>]) -> Option<usize> {
        servers
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.is_leader()))
    }
    assert!(wait_until(Duration::from_secs(20), || leader(&servers).is_some()));
    let l = leader(&servers).unwrap();
    // Register a store and report n regions (as splits do), in batches.
    let cluster = servers[l].as_ref().unwrap().cluster.clone();
    rt.block_on(cluster.put_store(atoll_proto::metapb::Store {
        id: 1,
        address: "127.0.0.1:1".into(),
        ..Default::default()
    }))
    .unwrap();
    let load = Instant::now();
    let region = |i: u64| atoll_proto::metapb::Region {
        id: 1000 + i,
        start_key: if i == 0 {
            vec![]
        } else {
            format!("r{i:08}").into_bytes()
        },
        end_key: if i + 1 == n {
            vec![]
        } else {
            format!("r{:08}", i + 1).into_bytes()
        },
        region_epoch: Some(atoll_proto::metapb::RegionEpoch {
            conf_ver: 1,
            version: 2,
        }),
        peers: vec![atoll_proto::metapb::Peer {
            id: 10_000_000 + i,
            store_id: 1,
            role: 0,
        }],
    };
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        cluster
            .report_batch_split(chunk.iter().map(|i| region(*i)).collect())
            .unwrap();
    }
    // Every member has applied all of them.
    let all_applied = wait_until(Duration::from_secs(120), || {
        servers
            .iter()
            .all(|s| s.as_ref().unwrap().node.state.read().regions.len() as u64 == n)
    });
    assert!(all_applied, "members did not apply {n} regions");
    eprintln!(
        "{n} regions replicated to 3 PD members in {:?}",
        load.elapsed()
    );
    // Kill the leader; time until a new leader answers routing for any key.
    let killed = Instant::now();
    let old = servers[l].take().unwrap();
    rt.block_on(old.stop());
    let served = wait_until(Duration::from_secs(30), || {
        servers.iter().flatten().any(|s| {
            s.is_leader()
                && s.cluster
                    .get_region(format!("r{:08}", n / 2).as_bytes())
                    .is_ok()
        })
    });
    let took = killed.elapsed();
    eprintln!("new PD leader served routing for {n} regions {took:?} after the old leader stopped");
    assert!(served);
    let new = leader(&servers).unwrap();
    let rec = servers[new]
        .as_ref()
        .unwrap()
        .cluster
        .get_region(format!("r{:08}", n - 1).as_bytes())
        .unwrap();
    assert_eq!(rec.region.unwrap().id, 1000 + n - 1);
    assert!(took < Duration::from_secs(10), "failover took {took:?}");
    for s in servers.into_iter().flatten() {
        rt.block_on(s.stop());
    }
}
