//! The product end to end: real `pd-server`, `storage-node` and `kvctl` processes on free
//! local ports (issue: the product end to end).

use atoll_tests::procs::{ClusterOpts, ProcCluster};
use atoll_tests::wait_until;
use serde_json::Value;
use std::collections::HashSet;
use std::time::{Duration, Instant};

fn out_str(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn err_str(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

/// Every region has `replicas` voters on distinct stores and a leader.
fn regions_healthy(v: &Value, replicas: usize) -> bool {
    let Some(rs) = v["regions"].as_array() else {
        return false;
    };
    !rs.is_empty()
        && rs.iter().all(|r| {
            let peers = r["peers"].as_array().cloned().unwrap_or_default();
            let stores: HashSet<u64> = peers
                .iter()
                .filter_map(|p| p["store_id"].as_u64())
                .collect();
            let voters = peers.iter().filter(|p| p["role"] == "voter").count();
            voters == replicas
                && peers.len() == replicas
                && stores.len() == replicas
                && r["leader"].is_object()
        })
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
    let kvs = v["kvs"].as_array().unwrap();
    assert_eq!(kvs.len(), 1);
    assert_eq!(kvs[0]["key"], "b");
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
