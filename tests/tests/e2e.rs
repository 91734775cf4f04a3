//! The product end to end: real `pd-server`, `storage-node` and `kvctl` processes on free
//! local ports (issue: the product end to end).

use atoll_tests::procs::{regions_healthy, ClusterOpts, ProcCluster};
use atoll_tests::wait_until;
use serde_json::Value;
use std::time::{Duration, Instant};

fn out_str(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn err_str(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

#[test]
fn put_get_and_three_replicas() {
    let c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores: 3,
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(60));
    let o = c.kvctl(&["put", "hello", "world"]);
    assert!(o.status.success(), "{}", err_str(&o));
    let o = c.kvctl(&["get", "hello"]);
    assert!(o.status.success(), "{}", err_str(&o));
    assert_eq!(out_str(&o), "world");
    let v = c.kvctl_json(&["get", "hello"]);
    assert_eq!(v["key"], "hello");
    assert_eq!(v["value"], "world");
    let v = c.kvctl_json(&["get", "absent"]);
    assert!(v["value"].is_null());
    let ok = wait_until(Duration::from_secs(60), || {
        regions_healthy(&c.kvctl_json(&["regions"]), 3)
    });
    assert!(
        ok,
        "regions never reached 3 peers: {}",
        c.kvctl_json(&["regions"])
    );
    let stores = c.kvctl_json(&["stores"]);
    assert_eq!(stores["stores"].as_array().unwrap().len(), 3);
    for s in stores["stores"].as_array().unwrap() {
        assert_eq!(s["state"], "up");
    }
    // Delete, scan, tso, members.
    assert!(c.kvctl(&["put", "a", "1"]).status.success());
    assert!(c.kvctl(&["put", "b", "2"]).status.success());
    assert!(c.kvctl(&["delete", "a"]).status.success());
    let v = c.kvctl_json(&["scan", "a", "c"]);
    // The JSON shape is the contract (INTERFACE.md): exactly {"kvs":[...]}, nothing more.
    assert_eq!(v, serde_json::json!({"kvs": [{"key": "b", "value": "2"}]}));
    let v = c.kvctl_json(&["scan", "a", "c", "--with-revision"]);
    assert_eq!(v["kvs"], serde_json::json!([{"key": "b", "value": "2"}]));
    assert!(v["revision"].as_u64().unwrap() > 0, "{v}");
    let t1 = c.kvctl_json(&["tso"])["ts"].as_u64().unwrap();
    let t2 = c.kvctl_json(&["tso"])["ts"].as_u64().unwrap();
    assert!(t2 > t1);
    let m = c.kvctl_json(&["members"]);
    assert_eq!(m["members"].as_array().unwrap().len(), 1);
    assert_eq!(m["members"][0]["is_leader"], true);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores: 1,
        pd_args: vec!["--max-replicas".into(), "1".into()],
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(60));
    let big_key = "k".repeat(8 * 1024 + 1);
    let max_key = "k".repeat(8 * 1024);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["put", "", "v"], "empty"),
        (vec!["get", ""], "empty"),
        (vec!["put", &big_key, "v"], "exceeds"),
        (vec!["scan", "z", "a"], "after its end"),
        (vec!["txn", "put", "x"], "bad transaction op"),
    ];
    for (args, want) in &cases {
        let o = c.kvctl(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let e = err_str(&o);
        assert_eq!(e.lines().count(), 1, "{args:?}: not one line: {e}");
        assert!(e.contains(want), "{args:?}: {e}");
    }
    // The largest key is fine.
    assert!(c.kvctl(&["put", &max_key, "v"]).status.success());
    // A value over 8 MiB.
    let f = c.path().join("big-value");
    std::fs::write(&f, vec![b'v'; 8 * 1024 * 1024 + 1]).unwrap();
    let o = c.kvctl(&["put", "bigval", "--value-file", f.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(err_str(&o).contains("exceeds"), "{}", err_str(&o));
    // Nothing changed.
    let v = c.kvctl_json(&["scan", "", ""]);
    let keys: Vec<String> = v["kvs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !keys
            .iter()
            .any(|k| k == "bigval" || k.is_empty() || k.len() > 8192),
        "{keys:?}"
    );
    // An unreachable PD fails within the deadline.
    let start = Instant::now();
    let port = atoll_tests::procs::free_port();
    let o = atoll_tests::procs::kvctl(
        &format!("127.0.0.1:{port}"),
        &["--timeout", "3", "get", "x"],
    );
    assert!(!o.status.success());
    assert_eq!(err_str(&o).lines().count(), 1, "{}", err_str(&o));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn automatic_split_keeps_every_key() {
    let c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores: 3,
        store_args: vec!["--region-split-size".into(), "256KiB".into()],
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(60));
    let o = c.kvctl(&[
        "bench",
        "put",
        "--keys",
        "30000",
        "--value-size",
        "256",
        "--clients",
        "32",
    ]);
    assert!(o.status.success(), "bench failed: {}", err_str(&o));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["ops"], 30000);
    assert_eq!(report["errors"], 0);
    eprintln!("bench put: {report}");
    let ok = wait_until(Duration::from_secs(120), || {
        let v = c.kvctl_json(&["regions"]);
        v["regions"].as_array().map_or(0, |r| r.len()) >= 8 && regions_healthy(&v, 3)
    });
    let v = c.kvctl_json(&["regions"]);
    assert!(
        ok,
        "{} regions: {v}",
        v["regions"].as_array().map_or(0, |r| r.len())
    );
    eprintln!(
        "regions after bench: {}",
        v["regions"].as_array().unwrap().len()
    );
    let scan = c.kvctl_json(&["scan", "bench/", "bench0", "--keys-only"]);
    let keys: Vec<String> = scan["kvs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = (0..30000).map(|i| format!("bench/{i:010}")).collect();
    assert_eq!(keys.len(), want.len());
    assert_eq!(
        keys, want,
        "the scan must return exactly the keys written, sorted, each once"
    );
}

fn client(c: &ProcCluster, rt: &tokio::runtime::Runtime) -> std::sync::Arc<atoll_client::Client> {
    let mut cfg =
        atoll_client::ClientConfig::new(atoll_pd_client::rpc::parse_endpoints(&c.pd_endpoints()));
    cfg.timeout = Duration::from_secs(10);
    cfg.rpc_timeout = Duration::from_secs(2);
    rt.block_on(atoll_client::Client::connect(cfg))
        .expect("client")
}

/// The store with the most leaders, by index.
fn busiest_store(c: &ProcCluster) -> usize {
    let v = c.kvctl_json(&["stores"]);
    let s = v["stores"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|s| s["leader_count"].as_u64().unwrap_or(0))
        .unwrap()
        .clone();
    c.store_index_of(s["id"].as_u64().unwrap()).unwrap()
}

#[test]
fn kill_the_busiest_store_while_writing() {
    let mut c = ProcCluster::start(ClusterOpts {
        pds: 1,
        stores: 3,
        ..Default::default()
    });
    c.wait_ready(Duration::from_secs(60));
    assert!(wait_until(Duration::from_secs(60), || regions_healthy(
        &c.kvctl_json(&["regions"]),
        3
    )));
    let o = c.kvctl(&["split", "kill/3", "kill/6"]);
    assert!(o.status.success(), "{}", err_str(&o));
    assert!(wait_until(Duration::from_secs(60), || regions_healthy(
        &c.kvctl_json(&["regions"]),
        3
    )));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cl = client(&c, &rt);
    // Writers: each writes its own keys in a loop and records what was acknowledged (and when).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<(String, Instant)>::new()));
    let mut writers = vec![];
    for w in 0..8 {
        let (cl, stop, acked) = (cl.clone(), stop.clone(), acked.clone());
        writers.push(rt.spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let k = format!("kill/{}{w}-{i:06}", i % 10);
                if cl.put(k.as_bytes(), b"v").await.is_ok() {
                    acked.lock().push((k, Instant::now()));
                }
                i += 1;
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(3));
    let victim = busiest_store(&c);
    eprintln!(
        "killing store index {victim} (pid {:?})",
        c.stores[victim].proc_.pid()
    );
    let killed_at = Instant::now();
    c.stores[victim].proc_.kill();
    // Writes to every region (the split points cut kill/0-2, kill/3-5, kill/6-9) must succeed
    // again within 5 s.
    let region_of = |k: &str| match k.as_bytes()[5] {
        b'0'..=b'2' => 0,
        b'3'..=b'5' => 1,
        _ => 2,
    };
    let first_after = |acked: &[(String, Instant)]| {
        let mut first: [Option<Duration>; 3] = [None; 3];
        for (k, t) in acked {
            if *t > killed_at {
                let r = region_of(k);
                if first[r].is_none() {
                    first[r] = Some(*t - killed_at);
                }
            }
        }
        first
    };
    let resumed = wait_until(Duration::from_secs(5), || {
        first_after(&acked.lock()).iter().all(|f| f.is_some())
    });
    eprintln!(
        "first acknowledged write per region after the kill: {:?}",
        first_after(&acked.lock())
    );
    assert!(
        resumed,
        "writes did not succeed again in every region within 5 s of the kill"
    );
    std::thread::sleep(Duration::from_secs(2));
    // Restart it with its data directory; it rejoins and catches up.
    c.stores[victim].proc_.start();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        let _ = rt.block_on(w);
    }
    let keys: Vec<String> = acked.lock().iter().map(|(k, _)| k.clone()).collect();
    eprintln!("{} acknowledged writes", keys.len());
    assert!(wait_until(Duration::from_secs(30), || {
        let v = c.kvctl_json(&["stores"]);
        v["stores"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["state"] == "up" && !s["is_down"].as_bool().unwrap_or(true))
    }));
    // Let it catch up, then stop another store: every key must still read back, which needs
    // the restarted store's copy.
    std::thread::sleep(Duration::from_secs(5));
    let other = (victim + 1) % 3;
    c.stores[other].proc_.kill();
    let mut missing = vec![];
    for k in &keys {
        match rt.block_on(cl.get(k.as_bytes())) {
            Ok(Some(_)) => {}
            other => missing.push((k.clone(), format!("{other:?}"))),
        }
    }
    assert!(
        missing.is_empty(),
        "{} acknowledged keys lost or unreadable, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}
